"""Decode speed with and without the KV cache, against a bare single-token forward.

Random weights (speed does not depend on them). Prints one table; BENCHMARKS.md keeps the numbers.
Usage: python bench/generate.py [--device cpu] [--tokens 500 2000] [--shapes default gpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import KVCache, LanguageModel, SamplingConfig  # noqa: E402
from utils.device import synchronize  # noqa: E402
from utils.setup import setup_from_flags  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "presets" / "gpu.yaml"
SHAPES = {"default": [], "gpu": ["--config", str(PRESET)]}  # train.py flags


def decode_rate(model: LanguageModel, new_tokens: int, use_cache: bool,
                device: torch.device) -> float:
    """Tokens/s of sampling new_tokens after a one-character prompt (prefill excluded)."""
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    stream = model.generate_stream(prompt, new_tokens, SamplingConfig(temperature=1.0),
                                   generator, use_cache)
    next(stream)  # the prefill and first token
    synchronize(device)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    synchronize(device)
    return count / (time.perf_counter() - start)


@torch.no_grad()
def single_token_forward_ms(
    model: LanguageModel, device: torch.device, repeats: int = 200
) -> float:
    """Median time of model(one token, cache) halfway into the window: the decode step's core."""
    cache = KVCache(model.config, 1)
    half = model.config.block_size // 2
    model(torch.zeros(1, half, dtype=torch.long, device=device), cache=cache)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats):
        cache.length = half
        synchronize(device)
        start = time.perf_counter()
        model(token, cache=cache)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    setups = {name: setup_from_flags([*SHAPES[name], "--device", args.device])
              for name in args.shapes}
    device = next(iter(setups.values())).device
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | new tokens | cached tok/s | uncached tok/s | speed-up | "
          "1-token forward ms | cached ms/token | loop overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        torch.manual_seed(0)
        model = LanguageModel(setups[name].config.model).to(device).eval()
        forward_ms = single_token_forward_ms(model, device)
        for new_tokens in args.tokens:
            cached = decode_rate(model, new_tokens, True, device)
            uncached = decode_rate(model, new_tokens, False, device)
            per_token_ms = 1e3 / cached
            print(f"| {name} | {new_tokens} | {cached:,.0f} | {uncached:,.0f} | "
                  f"{cached / uncached:.1f}x | {forward_ms:.3f} | {per_token_ms:.3f} | "
                  f"{per_token_ms / forward_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
