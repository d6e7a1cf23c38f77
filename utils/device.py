"""Device and precision choices: which device `auto` means and which autocast dtype to use."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import time

import torch

from utils.errors import UserError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_WORDS = "auto, cpu, mps, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"device={name!r} is not a device: pass {DEVICE_WORDS}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name} but MPS is not available here; use --device cpu or auto")
    return device


def memory_bytes(device: torch.device) -> int:
    """All the memory of device: a GPU's own, or the machine's (a CPU, or MPS, which shares it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse work whose memory (a lower bound of it, in bytes) is more than the device has,
    before it starts: it could only fail, or on a CPU fill the memory until the system ends
    the process."""
    available = memory_bytes(device)
    if needed > available:
        raise UserError(f"{what} need at least {needed / 2**30:,.1f} GiB, more than the "
                        f"{available / 2**30:,.1f} GiB of memory {device} has; {advice}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `name` on `device`; `auto` is bf16 on CUDA that supports it,
    fp16 on older CUDA, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("dtype=float16 is not supported on CPU; use bfloat16 or float32")
    return dtype


# glibc's mallopt() parameters (malloc.h), and its largest mmap threshold on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
# measuring the matmul ceiling: products timed per size, and the product time that ends it
MATMUL_TIMING_REPEATS, MATMUL_TIMING_SECONDS = 5, 0.02


def configure_backends(device: torch.device) -> None:
    """Backend switches that pay on this device: TF32 matmuls and convolutions on CUDA, which
    keep float32 storage but multiply with a 10-bit mantissa on tensor cores; on the CPU,
    freed memory kept for reuse (keep_freed_memory)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the blocks (up to 32 MB) this process frees for its next
    allocations, instead of returning them to the OS; True where it took effect.

    A training step frees and allocates the same multi-megabyte activations every step. By
    default glibc serves blocks that large with fresh pages from the OS, so every step pays
    page faults for them, a visible share of a CPU step at the default shape (BENCHMARKS.md).
    The price is that the process keeps its peak memory until it exits. Where the C library is
    not glibc (macOS, musl), nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError, TypeError):
        return False
    # both: above the mmap threshold a block comes from mmap and goes back when freed; above
    # the trim threshold, free memory at the top of the heap goes back to the OS
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def measure_matmul_flops(device: torch.device, dtype: torch.dtype,
                         max_size: int | None = None) -> float:
    """FLOP/s of the fastest square matmul in `dtype` on `device`: the ceiling MFU is measured
    against when no peak_flops is configured. Sizes double from 256 up to max_size (4096 on
    CUDA, whose peak needs large products; 1024 elsewhere), stopping early once one product
    takes longer than MATMUL_TIMING_SECONDS: on a CPU without native bfloat16 one product at
    1024 is slow enough that timing every size would hold up a run's start."""
    max_size = max_size or (4096 if device.type == "cuda" else 1024)
    # a private generator: drawing from the global one would shift training's random stream
    generator = torch.Generator(device=device).manual_seed(0)
    best, size = 0.0, min(256, max_size)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        a @ b  # warm-up: kernel selection, caches, clocks
        synchronize(device)
        start = time.perf_counter()
        for _ in range(MATMUL_TIMING_REPEATS):
            a @ b
        synchronize(device)
        seconds = (time.perf_counter() - start) / MATMUL_TIMING_REPEATS
        best = max(best, 2 * size**3 / seconds)
        if size >= max_size or seconds > MATMUL_TIMING_SECONDS:
            return best
        size *= 2


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """measure_matmul_flops, measured once per process for each device, dtype and CPU thread
    count: a process that trains several runs (a notebook, a test session) pays for it once."""
    return _measured_peak_flops(device, dtype, torch.get_num_threads())


@functools.cache
def _measured_peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    return measure_matmul_flops(device, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on the device, so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
