"""Training throughput of each speed mode against a naive baseline, on the current device.

First the matmul ceilings through each path torch offers here and the attention kernels SDPA
can use for each shape (forward + backward), then tokens/s, MFU and peak memory of the training
step train.py runs (utils/training.py) for the default config and the GPU preset's shape, in
each mode: eager or torch.compile, float32 or bf16 autocast, fused or plain AdamW. The naive
baseline (eager, float32, plain AdamW, default threads) is what a straightforward nanoGPT-style
loop does. Each mode: warm-up steps, then the median of several timed windows.

Usage: python bench/train_throughput.py [--device cpu] [--shapes default gpu] [--windows 3]
       python bench/train_throughput.py --paths-only     # the matmul and attention tables alone
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.mkldnn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.device import synchronize  # noqa: E402
from utils.setup import Setup, setup_from_flags  # noqa: E402
from utils.training import init_state, optimizer_step  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "presets" / "gpu.yaml"
SHAPES = {  # (train.py flags, steps per timed window on CPU)
    "default": ([], 6),
    "gpu": (["--config", str(PRESET)], 2),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    use_compile: bool
    dtype: torch.dtype
    fused: bool


MODES = [
    Mode("naive: eager fp32, plain AdamW", False, torch.float32, False),
    Mode("eager fp32, fused AdamW", False, torch.float32, True),
    Mode("eager bf16, fused AdamW", False, torch.bfloat16, True),
    Mode("compiled fp32, fused AdamW", True, torch.float32, True),
    Mode("compiled bf16, fused AdamW", True, torch.bfloat16, True),
]


def matmul_ceilings(device: torch.device, size: int = 2048) -> dict[str, float]:
    """GFLOP/s of a square product through each path: the ceilings MFU is read against."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    paths = {"float32 torch.mm": lambda: a @ b,
             "bf16 torch.mm": lambda: a16 @ b16}
    a16, b16 = a.bfloat16(), b.bfloat16()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        linear = torch.utils.mkldnn.to_mkldnn(torch.nn.Linear(size, size, bias=False))
        a_mkldnn = a.to_mkldnn()
        paths["float32 oneDNN linear"] = lambda: linear(a_mkldnn)
        paths["float32 torch.mm, oneDNN implicit bf16"] = lambda: a @ b
    if device.type == "cuda":
        paths["float32 torch.mm (TF32)"] = lambda: a @ b
    ceilings = {}
    for name, product in paths.items():
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = "TF32" in name
        if device.type == "cpu":
            # float32 products may run as bf16 inside oneDNN: the CPU's counterpart of TF32
            torch.backends.mkldnn.matmul.fp32_precision = ("bf16" if "implicit bf16" in name
                                                          else "ieee")
        product()
        synchronize(device)
        start, repeats = time.perf_counter(), 5 if device.type == "cpu" else 50
        for _ in range(repeats):
            product()
        synchronize(device)
        ceilings[name] = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
    if device.type == "cpu":
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # what training uses
    return ceilings


def shape_setup(shape: str, device: torch.device, mode: Mode | None = None) -> Setup:
    """The shape's config on this device, in the mode's dtype and compilation."""
    flags = [*SHAPES[shape][0], "--device", str(device), "--seed", "0"]
    if mode is not None:
        flags += ["--dtype", str(mode.dtype).removeprefix("torch."),
                  "--compile" if mode.use_compile else "--no-compile"]
    return setup_from_flags(flags)


def attention_paths(shape: str, device: torch.device) -> dict[str, float]:
    """Milliseconds for causal SDPA forward + backward at the shape's size, per kernel that
    accepts it here, in float32 and bf16."""
    setup = shape_setup(shape, device)
    config, batch_size = setup.config.model, setup.config.train.batch_size
    head_dim = config.n_embd // config.n_head
    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if device.type == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(batch_size, config.n_head, config.block_size, head_dim,
                               device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for backend in backends:
            try:
                for _ in range(3):  # warm-up: the first calls allocate and pick code paths
                    _attention_step(q, k, v, backend)
            except RuntimeError:  # this kernel does not take these inputs here
                continue
            synchronize(device)
            repeats = 10 if device.type == "cpu" else 50
            start = time.perf_counter()
            for _ in range(repeats):
                _attention_step(q, k, v, backend)
            synchronize(device)
            name = f"{str(dtype)[6:]} {backend.name.lower()}"
            timings[name] = (time.perf_counter() - start) / repeats * 1e3
    return timings


def _attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    backend: SDPBackend) -> None:
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()


def throughput(shape: str, mode: Mode, device: torch.device, windows: int) -> dict[str, float]:
    steps = SHAPES[shape][1] * (10 if device.type == "cuda" else 1)
    setup = shape_setup(shape, device, mode)
    state = init_state(setup)
    if not mode.fused:
        state.optimizer = torch.optim.AdamW(state.model.parameters(), lr=1e-3, fused=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            optimizer_step(state, setup)
        synchronize(device)
        return time.perf_counter() - start

    warmup_s = run(3)  # includes compilation for compiled modes
    seconds = statistics.median(run(steps) for _ in range(windows))
    tokens_per_s = steps * setup.tokens_per_step() / seconds
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    return {"tokens_per_s": tokens_per_s, "warmup_s": warmup_s, "peak_mb": peak_mb,
            "flops_per_s": tokens_per_s * state.model.flops_per_token()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--paths-only", action="store_true",
                        help="print the matmul and attention tables, skip the training modes")
    args = parser.parse_args()
    device = torch.device(args.device)
    ceilings = matmul_ceilings(device)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, device "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| matmul path (2048^3) | GFLOP/s |\n|---|---|")
    for name, gflops in ceilings.items():
        print(f"| {name} | {gflops:,.0f} |")
    print("\n| shape | SDPA kernel (causal, forward + backward) | ms |\n|---|---|---|")
    for shape in args.shapes:
        for name, ms in attention_paths(shape, device).items():
            print(f"| {shape} | {name} | {ms:.2f} |")
    if args.paths_only:
        return
    fp32_peak = max(v for k, v in ceilings.items() if k.startswith("float32"))
    bf16_peak = ceilings["bf16 torch.mm"]
    print("\n| shape | mode | tokens/s | vs naive | MFU vs fp32 ceiling | MFU vs bf16 ceiling "
          "| warm-up s | peak MiB |\n|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        baseline = None
        for mode in MODES:
            result = throughput(shape, mode, device, args.windows)
            baseline = baseline or result["tokens_per_s"]
            print(f"| {shape} | {mode.name} | {result['tokens_per_s']:,.0f} | "
                  f"{result['tokens_per_s'] / baseline:.2f}x | "
                  f"{100 * result['flops_per_s'] / 1e9 / fp32_peak:.0f}% | "
                  f"{100 * result['flops_per_s'] / 1e9 / bf16_peak:.0f}% | "
                  f"{result['warmup_s']:.1f} | {result['peak_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
