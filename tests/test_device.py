"""Process-wide CPU settings from utils/device.py."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import PROJECT_ROOT

# In a fresh process: glibc's own account of a 24-MB block, alive and then freed
MALLOC_PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from utils.device import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    mapped_before = libc.mallinfo2().hblkhd
    block = torch.ones(24 * 2**18)  # 24 MB
    mapped_for_block = libc.mallinfo2().hblkhd - mapped_before
    del block
    print(kept, mapped_for_block >> 20, libc.mallinfo2().fordblks >> 20)
""")


def malloc_probe(mode: str) -> tuple[str, int, int]:
    """(keep_freed_memory's answer, MB mapped for the block, MB free in the heap after it)."""
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True)
    kept, mapped, free = result.stdout.split()
    return kept, int(mapped), int(free)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_freed_blocks_stay_in_the_process_for_the_next_step():
    # glibc by default maps a block this large from the OS and unmaps it when freed, so the
    # next step's block of the same size starts on fresh pages
    _, mapped, _ = malloc_probe("default")
    assert mapped >= 24
    kept, mapped, free = malloc_probe("keep")
    assert kept == "True"
    assert mapped == 0  # from the heap...
    assert free >= 24  # ...which keeps it, freed, for the next allocation
