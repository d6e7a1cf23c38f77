"""Training throughput of each speed mode against a naive baseline, on the current device.

First the matmul ceilings through each path torch offers here, then tokens/s, MFU and peak
memory of train.py's own training step for the default config and the GPU preset's shape, in
each mode: eager or torch.compile, float32 or bf16 autocast, fused or plain AdamW. The naive
baseline (eager, float32, plain AdamW, default threads) is what a straightforward nanoGPT-style
loop does. Each mode: warm-up steps, then the median of several timed windows.

Usage: python bench/train_throughput.py [--device cpu] [--shapes default gpu] [--windows 3]
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
import torch.utils.mkldnn

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
    if device.type == "cuda":
        paths["float32 torch.mm (TF32)"] = lambda: a @ b
    ceilings = {}
    for name, product in paths.items():
        tf32 = "TF32" in name
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        product()
        synchronize(device)
        start, repeats = time.perf_counter(), 5 if device.type == "cpu" else 50
        for _ in range(repeats):
            product()
        synchronize(device)
        ceilings[name] = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
    return ceilings


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
    args = parser.parse_args()
    device = torch.device(args.device)
    ceilings = matmul_ceilings(device)
    configure_backends(device)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, device "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| matmul path (2048^3) | GFLOP/s |\n|---|---|")
    for name, gflops in ceilings.items():
        print(f"| {name} | {gflops:,.0f} |")
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
