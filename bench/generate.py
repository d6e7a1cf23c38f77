"""Decode speed: the KV cache against none, the decode weight layouts (prepared_for_decoding)
and the compiled step (compiled_for_decoding, utils/decoding.py) against plain F.linear,
batches against one sample, and each mode's agreement with float32.

Speed rows use random weights (speed does not depend on them). Agreement needs a trained model,
whose logits are peaked as in real use: pass --run runs/<id> (its export) and the table gains
how many of 500 greedy tokens each layout shares with plain float32 before the first
difference, and the largest logit difference over a block of its own text.
Prints tables; BENCHMARKS.md keeps the numbers.
Usage: python bench/generate.py [--device cpu] [--shapes default gpu] [--run runs/<id>]
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

from generation import SamplingConfig, generate  # noqa: E402
from model import KVCache, LanguageModel  # noqa: E402
from utils import private_torch  # noqa: E402
from utils.checkpoint import load_export  # noqa: E402
from utils.decoding import (  # noqa: E402
    Decoder,
    compile_decode_step,
    compiled_for_decoding,
    gated_feature,
    prepared_for_decoding,
)
from utils.device import synchronize  # noqa: E402
from utils.runs import RunPaths  # noqa: E402
from utils.setup import setup_from_flags  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "presets" / "gpu.yaml"
SHAPES = {"default": [], "gpu": ["--config", str(PRESET)]}  # train.py flags
# F.linear: the model as trained; compiled: its decode step compiled with the weights frozen
# in (inference.py --compile), compiled-bfloat16 with bfloat16 weights (with --dtype
# bfloat16); the others: prepared_for_decoding
LAYOUTS = ("F.linear", "float32", "bfloat16", "int8", "int8-dynamic", "compiled",
           "compiled-bfloat16")


def layout_closed_reason(layout: str) -> str | None:
    """Why this torch cannot decode with the layout (utils/private_torch.py), or None."""
    is_compiled = layout.startswith("compiled")
    weights = "float32" if layout in ("F.linear", "compiled") else layout.removeprefix("compiled-")
    feature = gated_feature(weights, is_compiled)
    return None if feature is None else private_torch.closed_reason(feature)


def decoding_model(model: LanguageModel, layout: str) -> Decoder:
    if layout == "F.linear":
        return Decoder(model)
    if layout.startswith("compiled"):
        # forget the graphs compiled for earlier models, whose steps this process has run:
        # Dynamo stops compiling one function (model.forward, for every model) past a limit
        private_torch.reset_compiled_graphs()
        return compiled_for_decoding(model, "bfloat16" if layout.endswith("bfloat16")
                                     else "float32")
    return Decoder(prepared_for_decoding(model, layout))


@torch.no_grad()
def decoded_logits(decoder: Decoder, prompt: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) for the prompt (1, T) decoded one token at a time with the cache, as
    generation computes them (through the compiled step, where there is one)."""
    cache = KVCache(decoder.model.config, 1)
    logits = [decoder.model(prompt[:, :1], cache=cache)[0]]
    logits += [decoder.step(prompt[:, t:t + 1], cache)[0] for t in range(1, prompt.size(1))]
    return torch.cat(logits, dim=1)[0]


def decode_rate(decoder: Decoder, new_tokens: int, use_cache: bool, device: torch.device,
                batch_size: int = 1) -> float:
    """Decode steps per second while sampling new_tokens after a one-character prompt
    (prefill excluded); each step makes batch_size tokens."""
    prompt = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    stream = decoder.generate_stream(prompt, new_tokens, SamplingConfig(temperature=1.0),
                                     generator, use_cache)
    next(stream)  # the prefill and first token
    synchronize(device)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    synchronize(device)
    return count / (time.perf_counter() - start)


@torch.no_grad()
def single_token_forward_ms(decoder: Decoder, device: torch.device,
                            repeats: int = 200) -> float:
    """Median time of one cached step halfway into the window: the decode step's core."""
    cache = KVCache(decoder.model.config, 1)
    half = decoder.model.config.block_size // 2
    decoder.model(torch.zeros(1, half, dtype=torch.long, device=device), cache=cache)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats):
        cache.length = half
        synchronize(device)
        start = time.perf_counter()
        decoder.step(token, cache)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def agreement(reference: LanguageModel, decoder: Decoder, prompt: torch.Tensor,
              tokens: int) -> tuple[int, float]:
    """(greedy tokens equal to the reference's before the first difference, of `tokens`;
    the largest logit difference over the prompt's block, decoded token by token)."""
    ours = decoder.generate(prompt[:, :1], tokens, temperature=0)[0, 1:]
    theirs = generate(reference, prompt[:, :1], tokens, temperature=0)[0, 1:]
    differ = (ours != theirs).nonzero()
    same = tokens if len(differ) == 0 else int(differ[0])
    logit_gap = (decoded_logits(decoder, prompt) - reference(prompt)[0]).abs().max().item()
    return same, logit_gap


def speed_table(args: argparse.Namespace, device: torch.device) -> None:
    print("| shape | weights | cached tok/s | uncached tok/s | 1-token forward ms | "
          "cached ms/token | loop overhead | batch 8: ms/step | batch 8 / batch 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in args.shapes:
        torch.manual_seed(0)
        config = setup_from_flags([*SHAPES[name], "--device", str(device)]).config.model
        trained_like = LanguageModel(config).to(device).eval()
        with torch.no_grad():  # no zero-initialised layer: every product is real work
            for param in trained_like.parameters():
                param.normal_(0.0, 0.02)
        for layout in args.layouts:
            if layout.startswith("compiled") and device.type != "cpu":
                notes.append(f"{name}: no compiled row; inference.py compiles decoding on a "
                             "CPU only")
                continue
            if (reason := layout_closed_reason(layout)) is not None:
                notes.append(f"{name}: no {layout} row: {reason}")
                continue
            decoder = decoding_model(trained_like, layout)
            if decoder.compiled_step is not None:  # compiled before the timings, per batch size
                notes.append(f"{name}: compiling the decode step took "
                             f"{compile_decode_step(decoder, 1):.1f} s, again for batch 8 "
                             f"{compile_decode_step(decoder, 8):.1f} s")
            forward_ms = single_token_forward_ms(decoder, device)
            cached = decode_rate(decoder, args.tokens, True, device)
            uncached = (f"{decode_rate(decoder, args.tokens, False, device):,.0f}"
                        if layout == "F.linear" else "-")
            batched = decode_rate(decoder, args.tokens, True, device, batch_size=8)
            print(f"| {name} | {layout} | {cached:,.0f} | {uncached} | {forward_ms:.3f} | "
                  f"{1e3 / cached:.3f} | {1e3 / cached / forward_ms:.2f}x | "
                  f"{1e3 / batched:.3f} | {cached / batched:.2f}x |", flush=True)
    for note in notes:
        print(f"\n{note}")


def agreement_table(run: Path, tokens: int) -> None:
    model, tokenizer = load_export(RunPaths(run).export)
    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n" * 40
    known = "".join(c for c in text if c in tokenizer.chars)
    prompt = torch.tensor([tokenizer.encode(known[:model.config.block_size])])
    print(f"\nAgreement with float32 F.linear, {run} ({model.config.n_layer}x"
          f"{model.config.n_embd}):\n")
    print("| weights | greedy tokens equal before the first difference | max logit difference |")
    print("|---|---|---|")
    for layout in LAYOUTS[1:]:
        if (reason := layout_closed_reason(layout)) is not None:
            print(f"| {layout} | - ({reason}) | - |", flush=True)
            continue
        same, gap = agreement(model, decoding_model(model, layout), prompt, tokens)
        print(f"| {layout} | {same} of {tokens} | {gap:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--run", type=Path, help="a trained run, for the agreement table")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.tokens} new tokens\n")
    speed_table(args, device)
    if args.run:
        agreement_table(args.run, args.tokens)


if __name__ == "__main__":
    main()
