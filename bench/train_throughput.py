"""Training throughput of each speed mode against a naive baseline, on the current device.

First the matmul ceilings through each path torch offers here and the attention kernels SDPA
can use for each shape (forward + backward), then tokens/s, MFU and peak
memory of train.py's own training step for the default config and the GPU preset's shape, in
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

import train  # noqa: E402
from data import BatchSampler  # noqa: E402
from model import LanguageModel, ModelConfig  # noqa: E402
from utils.config import TrainConfig  # noqa: E402
from utils.device import configure_backends, synchronize  # noqa: E402

VOCAB_SIZE = 73
SHAPES = {  # (model, batch size, steps per timed window on CPU)
    "default": (ModelConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=4, n_head=4,
                            n_embd=128, dropout=0.0), 32, 6),
    "gpu": (ModelConfig(vocab_size=VOCAB_SIZE, block_size=256, n_layer=6, n_head=6, n_embd=384,
                        dropout=0.2), 64, 2),
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


def attention_paths(shape: str, device: torch.device) -> dict[str, float]:
    """Milliseconds for causal SDPA forward + backward at the shape's size, per kernel that
    accepts it here, in float32 and bf16."""
    config, batch_size, _ = SHAPES[shape]
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
    model_config, batch_size, steps = SHAPES[shape]
    if device.type == "cuda":
        steps *= 10
    torch.manual_seed(0)
    model = LanguageModel(model_config).to(device)
    cfg = TrainConfig(batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=mode.fused)
    step_model = torch.compile(model) if mode.use_compile else model
    data = torch.randint(VOCAB_SIZE, (200_000,))
    batches = BatchSampler(data, model_config.block_size, batch_size, seed=0, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    precision = (device, mode.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            train.train_step(step_model, optimizer, batches, cfg, precision, scaler)
        synchronize(device)
        return time.perf_counter() - start

    warmup_s = run(3)  # includes compilation for compiled modes
    seconds = statistics.median(run(steps) for _ in range(windows))
    tokens_per_s = steps * batch_size * model_config.block_size / seconds
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    return {"tokens_per_s": tokens_per_s, "warmup_s": warmup_s, "peak_mb": peak_mb,
            "flops_per_s": tokens_per_s * model.flops_per_token()}


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
    configure_backends(device)
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
