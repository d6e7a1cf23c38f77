"""Process-wide CPU settings from utils/device.py."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import PROJECT_ROOT

# In a fresh process: glibc's own account of a 24-MB block by default, and of another once
# keep_freed_memory has run and after it is freed. The first block stays alive: freeing it would
# raise glibc's dynamic mmap threshold, and the second would come from the heap anyway.
MALLOC_PROBE = textwrap.dedent("""
    import ctypes, torch
    from utils.device import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def mapped_for_a_block():
        mapped_before = libc.mallinfo2().hblkhd
        block = torch.ones(24 * 2**18)  # 24 MB
        return block, (libc.mallinfo2().hblkhd - mapped_before) >> 20

    first, mapped_by_default = mapped_for_a_block()
    kept = keep_freed_memory()
    second, mapped_when_kept = mapped_for_a_block()
    del second
    print(mapped_by_default, kept, mapped_when_kept, libc.mallinfo2().fordblks >> 20)
""")


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_freed_blocks_stay_in_the_process_for_the_next_step():
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True)
    mapped_by_default, kept, mapped_when_kept, free = result.stdout.split()
    # glibc by default maps a block this large from the OS and unmaps it when freed, so the
    # next step's block of the same size starts on fresh pages
    assert int(mapped_by_default) >= 24
    assert kept == "True"
    assert int(mapped_when_kept) == 0  # from the heap...
    assert int(free) >= 24  # ...which keeps it, freed, for the next allocation
