"""Generation on a CPU: weights laid out for decoding, and the compiled decode step.

Generation reads every weight once per token, so on a CPU the layout of the weights and the
per-step overhead set its speed. prepared_for_decoding copies a model with every matrix product
laid out for decoding a few rows at a time (float32 transposed, bfloat16, int8, int8-dynamic);
compiled_for_decoding copies one whose cached one-token steps run through torch.compile with
the weights frozen in (CompiledDecodeStep), the attention over the cache written as passes over
the keys and values (StreamedAttention). cpu_decoder picks among them for inference.py and
bench/generate.py (BENCHMARKS.md measures each).

A decoding copy is for generating only: it is never trained, saved or exported, and the model
it was copied from is left as it was. The int8 kernels and the compiled step call private
torch (utils/private_torch.py); where that is closed, cpu_decoder decodes the portable way.

    decoder = cpu_decoder(model, "float32", batch_size=1, compile_step=True)
    ids = decoder.generate(prompt_ids, 200, temperature=0)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import generation
from model import CausalSelfAttention, KVCache, LanguageModel, ModelConfig
from utils import console, private_torch

DecodeWeights = Literal["float32", "bfloat16", "int8", "int8-dynamic"]
# choosing a CPU layout: the fastest of a few decode steps of each, in alternating rounds
LAYOUT_TIMING_STEPS, LAYOUT_TIMING_ROUNDS = 4, 3


@dataclass(frozen=True)
class Decoder:
    """A model copy prepared for generation and, if it has one, the compiled step that runs
    its cached one-token steps (the prefills run the model)."""

    model: LanguageModel
    compiled_step: CompiledDecodeStep | None = None

    def step(self, idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits (B, 1, vocab) of the next tokens idx (B, 1), as generation computes them."""
        return (self.compiled_step or self.model)(idx, cache=cache)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int,
                        sampling: generation.SamplingConfig | None = None,
                        generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[torch.Tensor]:
        """generation.generate_stream, the cached steps through the compiled step."""
        return generation.generate_stream(self.model, idx, max_new_tokens, sampling, generator,
                                          use_cache, step=self.compiled_step)

    def generate_steps(self, idx: torch.Tensor, max_new_tokens: int,
                       sampling: generation.SamplingConfig | None = None,
                       generator: torch.Generator | None = None
                       ) -> Iterator[generation.SampledStep]:
        """generation.generate_steps, the cached steps through the compiled step."""
        return generation.generate_steps(self.model, idx, max_new_tokens, sampling, generator,
                                         step=self.compiled_step)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """generation.generate, the cached steps through the compiled step."""
        return generation.generate(self.model, idx, max_new_tokens, step=self.compiled_step,
                                   **sampling)


def cpu_decoder(model: LanguageModel, weights: DecodeWeights, batch_size: int,
                compile_step: bool = False) -> Decoder:
    """The model laid out for decoding batch_size samples on this CPU with weights; with
    compile_step (float32 or bfloat16) its cached steps compiled. Where that needs a private
    torch feature this torch does not open (utils/private_torch.py), one warning, then the
    portable path: the same decoding without the compiled step, or float32 weights for int8."""
    feature = gated_feature(weights, compile_step)
    reason = None if feature is None else private_torch.closed_reason(feature)
    if reason is not None:
        portable: DecodeWeights = "float32" if weights.startswith("int8") else weights
        what = "compiled decoding" if compile_step else f"decoding with {weights} weights"
        console.warn(f"{what} is off: {reason}; decoding on the portable path (eager, "
                     f"{portable} weights)")
        weights, compile_step = portable, False
    if compile_step:
        return compiled_for_decoding(model, weights)
    prepared = prepared_for_decoding(model, weights)
    if weights != "float32":
        return Decoder(prepared)
    # whichever of F.linear's layout and the transposed one decodes faster on this CPU, which
    # differs between CPUs (BENCHMARKS.md); both give the same tokens
    candidates = [model.eval(), prepared]
    seconds = [math.inf] * len(candidates)
    for _ in range(LAYOUT_TIMING_ROUNDS):  # alternating, so a slow spell hits both
        for index, candidate in enumerate(candidates):
            seconds[index] = min(seconds[index], decode_step_seconds(candidate, batch_size))
    return Decoder(candidates[seconds.index(min(seconds))])


def gated_feature(weights: DecodeWeights, compile_step: bool) -> private_torch.Feature | None:
    """The private torch feature decoding with these weights (compiled or not) needs, if any."""
    if compile_step:
        return "compiled-decoding"
    if weights == "int8" or weights == "int8-dynamic":
        return weights
    return None


def decode_weights(quantize: str | None, dtype: torch.dtype) -> DecodeWeights:
    """The decode weights inference.py's --quantize and --dtype ask for."""
    if quantize:
        return typing.cast(DecodeWeights, quantize)
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


@torch.no_grad()
def decode_step_seconds(model: LanguageModel, batch_size: int) -> float:
    """Seconds of the fastest of a few cached single-token steps of batch_size samples."""
    cache = KVCache(model.config, batch_size)
    ids = torch.zeros(batch_size, 1, dtype=torch.long)
    seconds = []
    for _ in range(min(LAYOUT_TIMING_STEPS + 1, model.config.block_size)):
        start = time.perf_counter()
        model(ids, cache=cache)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:] or seconds)  # the first step also allocates the cache


@torch.no_grad()
def compile_decode_step(decoder: Decoder, batch_size: int) -> float:
    """Seconds to compile the decoder's cached step for batch_size samples, by running its
    first step on a scratch cache."""
    assert decoder.compiled_step is not None, "the decoder has no compiled step"
    cache = KVCache(decoder.model.config, batch_size)
    ids = torch.zeros(batch_size, 1, dtype=torch.long)
    decoder.model(ids, cache=cache)  # the eager prefill, which fills the first slot
    start = time.perf_counter()
    decoder.compiled_step(ids, cache=cache)
    return time.perf_counter() - start


def prepared_for_decoding(model: LanguageModel, weights: DecodeWeights = "float32"
                          ) -> LanguageModel:
    """A copy of the model for generation only, every matrix product laid out by DecodeLinear:
    the same function (float32), or smaller weights (bfloat16, int8, int8-dynamic)."""
    feature = gated_feature(weights, compile_step=False)
    if feature is not None:
        private_torch.require(feature)
    copied = copy.deepcopy(model).eval()
    replace_linears(copied, lambda weight, bias: DecodeLinear(weight, bias, weights))
    return copied


class DecodeLinear(nn.Module):
    """x W^T + b with W laid out for decoding a few rows at a time on a CPU.

    float32 and bfloat16 keep W transposed, (in, out) and contiguous: for one row, CPU kernels
    read that layout faster than F.linear's (out, in) on some CPUs (BENCHMARKS.md). int8 keeps
    W (out, in) with one float32 scale per output channel, for torch's weight-only int8
    kernel. int8-dynamic keeps the same int8 weights packed for torch's quantized engine,
    which also rounds each input to int8 with one scale per call: faster still on a CPU, but
    rows decoded together share that scale, so a sample can differ with its batch. Outputs
    are in the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 weights: DecodeWeights) -> None:
        super().__init__()
        self.weights = weights
        weight, bias = weight.detach(), None if bias is None else bias.detach().clone()
        if weights == "int8-dynamic":
            # the packed weights (and the bias) live in the quantized engine's own object
            self.packed = private_torch.packed_int8_linear(*int8_per_channel(weight), bias)
            bias = None
        elif weights == "int8":
            int8, scale = int8_per_channel(weight)
            self.register_buffer("weight", int8)
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("weight", weight.t().contiguous().to(getattr(torch, weights)))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if self.weights == "int8-dynamic":
            y = private_torch.dynamic_int8_linear(rows.float(), self.packed)
        elif self.weights == "int8":
            y = private_torch.int8_weight_matmul(rows.float(), self.weight, self.scale)
        else:
            y = torch.matmul(x.to(self.weight.dtype), self.weight)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output channel), symmetric: each row's largest
    magnitude maps to 127."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12).float() / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def compiled_for_decoding(model: LanguageModel, weights: DecodeWeights = "float32") -> Decoder:
    """A copy of the model whose cached one-token steps run through CompiledDecodeStep, the
    one query's attention written as sums (StreamedAttention); with bfloat16 weights the
    steps read bfloat16 copies of the matrices (BFloat16StepLinear). Prefills stay eager, with
    the float32 weights. The first step of a batch size compiles its graph, which every later
    step of that batch size reuses, whatever its position. Compiling takes far longer than a
    step, so it pays for long generations (BENCHMARKS.md). The step packs its own copies of
    the matrices when it compiles: change the weights, and compile a new copy."""
    if weights not in ("float32", "bfloat16"):
        raise ValueError(f"compiled decoding takes float32 or bfloat16 weights, not {weights}")
    private_torch.require("compiled-decoding")
    copied = copy.deepcopy(model).eval()
    for block in copied.blocks:
        block.attn = StreamedAttention.replacing(block.attn, copied.config)
    if weights == "bfloat16":
        replace_linears(copied, BFloat16StepLinear)
    return Decoder(copied, CompiledDecodeStep(copied.forward))


class CompiledDecodeStep:
    """A model's forward through torch.compile for decode steps, with its weights frozen into
    the graph, every product in inductor's own C++ matrix kernels, and the cache position
    symbolic from the first step (private_torch.compile_with_frozen_weights).

    Freezing makes the weights constants of the graph, which inductor packs once into the
    blocked layout of its C++ matrix kernels; on a CPU those read the weights faster than the
    kernels behind F.linear for one sample or a batch, in float32 and bfloat16 alike
    (BENCHMARKS.md), so aten's kernels are not timed against them, which would add seconds
    per shape to compiling. The kernels need constant weights, so every call runs without
    autograd, which freezing requires.

    The settings Dynamo reads while tracing (private_torch.frozen_weight_settings) are set
    around the first step of each batch size, the steps that compile: that step compiles one
    graph for every position of the cache, and a second batch size a graph of its own size.
    Later steps leave them alone, since setting and restoring them around every step would
    slow every step. A later step that needs another graph all the same
    (inputs of another dtype, say) fails to compile: the C++ kernels have no weights to pack.
    Only the weights' identity is checked before a step among the modules' attributes:
    switched to training, say, the copy's steps still decode.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = private_torch.compile_with_frozen_weights(forward)
        self.compiled_batch_sizes: set[int] = set()

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, None]:
        """The logits (B, 1, vocab) of the next tokens idx (B, 1), as model(idx, cache=cache)."""
        if idx.stride() != (1, 1):
            # a column of a longer tensor, such as a prompt: Dynamo would compile another
            # graph for its strides
            idx = idx.clone(memory_format=torch.contiguous_format)
        if idx.size(0) in self.compiled_batch_sizes:
            return self.forward(idx, cache=cache)
        with private_torch.frozen_weight_settings("cache.length"):  # forward's argument
            output = self.forward(idx, cache=cache)
        self.compiled_batch_sizes.add(idx.size(0))
        return output


class StreamedAttention(CausalSelfAttention):
    """CausalSelfAttention whose single query over the cache, inside a compiled graph, is
    written as sums (streamed_attention); everything else is SDPA, as in the model."""

    @classmethod
    def replacing(cls, attention: CausalSelfAttention, config: ModelConfig
                  ) -> StreamedAttention:
        """One with the layers of attention itself, the same weights."""
        with torch.device("meta"):  # its own layers are swapped for attention's below
            streamed = cls(config, attention.layer_index)
        for name, layer in attention.named_children():
            setattr(streamed, name, layer)
        return streamed.train(attention.training)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        if (torch.compiler.is_compiling() and q.size(-2) == 1 and mask is not None
                and dropout_p == 0.0):
            return streamed_attention(q, k, v, mask)
        return super().attend(q, k, v, mask, dropout_p)


def streamed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """SDPA of one query (B, H, 1, head_dim) over the masked cache, written as sums: inductor
    fuses them into one pass over the keys and one over the values, where a call to the
    CPU's SDPA kernel costs more than one query's arithmetic."""
    scores = (q * k).sum(dim=-1, keepdim=True) / math.sqrt(q.size(-1))  # (B, H, keys, 1)
    scores = scores.masked_fill(~mask.mT, float("-inf"))
    return (torch.softmax(scores, dim=-2) * v).sum(dim=-2, keepdim=True)


class BFloat16StepLinear(nn.Module):
    """x W^T + b that reads a bfloat16 copy of W inside a compiled graph (the decode steps:
    half the bytes per step, added up in float32 by inductor's kernels, the output rounded to
    bfloat16) and W itself in eager calls (the prefills, where a CPU without bfloat16
    arithmetic would spend far longer on bfloat16 than the bytes save). Outputs are in the
    input's dtype."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.register_buffer("step_weight", weight.detach().to(torch.bfloat16),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.to(torch.bfloat16), self.step_weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


def replace_linears(copied: LanguageModel,
                    replacement: Callable[[nn.Parameter, nn.Parameter | None], nn.Module]
                    ) -> None:
    """Replace every nn.Linear of a decoding copy by replacement(weight, bias), and the output
    layer too: a tied head is the embedding, which stays an embedding, so the copy becomes an
    untied model whose head is a replacement over the embedding's weight."""
    linears = [(name, module) for name, module in copied.named_modules()
               if isinstance(module, nn.Linear)]
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        setattr(copied.get_submodule(parent_name), attribute,
                replacement(linear.weight, linear.bias))
    if copied.config.tie_embeddings:
        copied.config = dataclasses.replace(copied.config, tie_embeddings=False)
        copied.lm_head = replacement(copied.token_embedding.weight, None)
