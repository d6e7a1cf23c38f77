"""Generate text from a trained run, streamed to stdout as it is sampled (KV-cached).

Usage: python inference.py --run runs/<id> --prompt "ROMEO." --max-new-tokens 500
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generation import SamplingConfig
from model import ModelConfig
from tokenizer import CharTokenizer
from utils import console
from utils.config import DTYPES
from utils.config_loader import ArgumentParser
from utils.decoding import Decoder, compile_decode_step, cpu_decoder, decode_weights
from utils.device import autocast, check_memory, resolve_device, resolve_dtype
from utils.errors import UserError
from utils.runs import load_run_model
from utils.sampling import (
    StopFilter,
    check_at_least_one,
    check_prompt,
    check_seed,
    encode_prompt,
    sampling_settings,
)

SAMPLE_SEPARATOR = "\n---------------\n"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--run", default="latest",
        help="run folder to load, or 'latest' for the newest run with an export (default: latest)")
    add("--runs-dir", type=Path, default=Path("runs"),
        help="where 'latest' looks for runs (default: runs)")
    add("--checkpoint", metavar="NAME",
        help="load a training checkpoint (last, best or step_N) instead of the final export")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    add("--max-new-tokens", type=int, default=500, help="characters to generate (default: 500)")
    add("--num-samples", type=int, default=1,
        help="samples generated together as one batch, printed one after another (default: 1)")
    add("--temperature", type=float, default=0.8,
        help="softmax temperature; 0 = greedy (default: 0.8)")
    add("--top-k", type=int, help="sample only from the k most likely characters")
    add("--top-p", type=float, help="sample from the smallest set with this much probability")
    add("--min-p", type=float,
        help="drop characters less likely than min-p times the most likely one")
    add("--repetition-penalty", type=float, default=1.0,
        help="above 1 discourages characters already in the context (default: 1.0)")
    add("--stop", action="append", default=[], metavar="STRING",
        help="end a sample at the first occurrence of STRING (repeatable); not printed")
    add("--seed", type=int, help="random seed; the one used is reported (default: random)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    # one token at a time these models are bound by kernel launches, not arithmetic, so
    # autocast's extra casts only cost time (BENCHMARKS.md)
    add("--dtype", default="float32", choices=DTYPES,
        help="on a GPU the autocast precision (default: float32, the fastest for decoding "
             "small models); on a CPU bfloat16 stores the weights in bfloat16")
    add("--quantize", choices=["int8", "int8-dynamic"],
        help="CPU: int8 weights, one scale per output channel; int8-dynamic also rounds each "
             "layer's input to int8 (FBGEMM): the fastest for larger models (BENCHMARKS.md)")
    add("--compile", action="store_true",
        help="CPU: torch.compile the decode step with the weights frozen in; compiling takes "
             "far longer than a step, then each step runs faster, so it pays for long "
             "generations (BENCHMARKS.md). With --dtype bfloat16 the steps read bfloat16 "
             "weights")
    add("--no-kv-cache", action="store_true",
        help="recompute the whole context every step (the slow reference path)")
    add("--no-stream", action="store_true", help="print each sample only once it is complete")
    return parser


@dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def summary(self, seed: int) -> str:
        # the first token of each sample comes out of the prefill, not the decode loop
        decode_tokens = self.new_tokens - self.batch_size
        decode_rate = decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        return (f"prompt tokens {self.prompt_tokens}, new tokens {self.new_tokens}, "
                f"prefill {self.prefill_s * 1e3:.1f} ms, decode {self.decode_s * 1e3:.1f} ms, "
                f"decode {decode_rate:,.1f} tokens/s, seed {seed}")


def stream_samples(
    decoder: Decoder, tokenizer: CharTokenizer, prompt_ids: torch.Tensor,
    args: argparse.Namespace, sampling: SamplingConfig, generator: torch.Generator,
    stats: GenerationStats,
) -> Iterator[tuple[int, str]]:
    """Yield (sample index, text to show) as tokens arrive; stop once every sample has stopped."""
    filters = [StopFilter(args.stop) for _ in range(prompt_ids.size(0))]
    tokens = decoder.generate_stream(prompt_ids, args.max_new_tokens, sampling, generator,
                                     use_cache=not args.no_kv_cache)
    start = time.perf_counter()
    for step, next_ids in enumerate(tokens):
        ids = next_ids.tolist()  # waits for the device, so the timings below are real
        if step == 0:
            stats.prefill_s = time.perf_counter() - start
        stats.new_tokens += len(ids)
        for row, token in enumerate(ids):
            yield row, filters[row].feed(tokenizer.decode([token]))
        if all(f.stopped for f in filters):
            break
    stats.decode_s = time.perf_counter() - start - stats.prefill_s
    for row, stop_filter in enumerate(filters):
        yield row, stop_filter.flush()


def cache_bytes(config: ModelConfig, batch_size: int) -> int:
    """The float32 keys and values of a full context for batch_size samples, in bytes."""
    return 2 * 4 * config.n_layer * batch_size * config.block_size * config.n_embd


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        prompt = args.prompt
    else:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {error}") from None
    check_prompt(prompt)
    return prompt


def check_args(args: argparse.Namespace) -> SamplingConfig:
    check_at_least_one("max_new_tokens", args.max_new_tokens)
    check_at_least_one("num_samples", args.num_samples)
    check_seed(args.seed)
    return sampling_settings(args.temperature, args.top_k, args.top_p, args.min_p,
                             args.repetition_penalty)


def generate(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = check_args(args)
    prompt = read_prompt(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.quantize and device.type != "cpu":
        raise UserError(f"--quantize {args.quantize} is for decoding on a CPU, not {device}; "
                        "drop it, or pass --device cpu")
    if args.compile and device.type != "cpu":
        raise UserError(f"--compile compiles decoding on a CPU, not {device}; drop it, or "
                        "pass --device cpu")
    if args.compile and (args.quantize or dtype not in (torch.float32, torch.bfloat16)):
        weights = f"--quantize {args.quantize}" if args.quantize else f"--dtype {args.dtype}"
        raise UserError(f"--compile compiles float32 or bfloat16 decoding; {weights} measured "
                        "no faster compiled (BENCHMARKS.md); drop one of them")
    if args.compile and args.no_kv_cache:
        raise UserError("--compile compiles the cached decode step, which --no-kv-cache turns "
                        "off; drop one of them")
    if args.quantize and dtype != torch.float32:
        raise UserError(f"--quantize {args.quantize} and --dtype {args.dtype} each set the "
                        "weights' precision; pass one of them")
    saved = load_run_model(args.run, args.runs_dir, args.checkpoint, device)
    tokenizer, decoder = saved.tokenizer, Decoder(saved.model)
    # checked before a decoding copy is made (and perhaps compiled)
    check_memory(cache_bytes(saved.model.config, args.num_samples), device,
                 f"the key-value cache of {args.num_samples:,} samples would",
                 "lower --num-samples")
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    prompt_ids = prompt_ids.repeat(args.num_samples, 1)
    if device.type == "cpu":
        # weights laid out once for decoding; bfloat16 and int8 live in the weights, so the
        # activations stay float32 and need no autocast
        decoder = cpu_decoder(saved.model, decode_weights(args.quantize, dtype),
                              args.num_samples, args.compile)
        dtype = torch.float32
        if decoder.compiled_step is not None and decoder.model.config.block_size > 1:
            # compiled before generating, so the decode rate reported is the steps' alone
            console.info(f"compiled the decode step in "
                         f"{compile_decode_step(decoder, args.num_samples):.1f} s")
    seed = args.seed if args.seed is not None else torch.seed() % 2**32
    generator = torch.Generator(device=device).manual_seed(seed)

    stats = GenerationStats(batch_size=args.num_samples, prompt_tokens=prompt_ids.size(1))
    texts = [prompt] * args.num_samples
    stream = not args.no_stream
    if stream:
        sys.stdout.write(prompt)
    with autocast(device, dtype):
        for row, piece in stream_samples(decoder, tokenizer, prompt_ids, args, sampling,
                                         generator, stats):
            texts[row] += piece
            if stream and row == 0:
                sys.stdout.write(piece)
                sys.stdout.flush()
    # sample 0 was streamed live; the others are printed once the batch is done
    shown = texts[1:] if stream else texts
    if stream and shown:
        sys.stdout.write(SAMPLE_SEPARATOR)
    sys.stdout.write(SAMPLE_SEPARATOR.join(shown) + "\n")
    sys.stdout.flush()
    console.info(stats.summary(seed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(generate, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
