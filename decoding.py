"""Weights laid out for decoding, and the compiled decode step.

Generation reads every weight once per token, so on a CPU the layout of the weights and the
per-step overhead set its speed. prepared_for_decoding copies a model with every matrix product
laid out for decoding a few rows at a time (float32 transposed, bfloat16, int8, int8-dynamic);
compiled_for_decoding copies one whose cached one-token steps run through torch.compile with
the weights frozen in (CompiledDecodeStep), its products in inductor's packed C++ matrix
kernels and the attention over the cache as passes over the keys and values
(streamed_attention).
Both return a LanguageModel that generates as the original does (BENCHMARKS.md measures each).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache, LanguageModel

DecodeWeights = Literal["float32", "bfloat16", "int8", "int8-dynamic"]


class DecodeLinear(nn.Module):
    """x W^T + b with W laid out for decoding a few rows at a time on a CPU.

    float32 and bfloat16 keep W transposed, (in, out) and contiguous: for one row, CPU kernels
    read that layout about twice as fast as F.linear's (out, in). int8 keeps W (out, in) with
    one float32 scale per output channel, for torch's weight-only int8 kernel. int8-dynamic
    keeps the same int8 weights packed for torch's quantized engine (FBGEMM on x86), which also
    rounds each input to int8 with one scale per call: several times faster on a CPU, but rows
    decoded together share that scale, so a sample can differ with its batch. Outputs are in
    the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 weights: DecodeWeights) -> None:
        super().__init__()
        self.weights = weights
        weight, bias = weight.detach(), None if bias is None else bias.detach().clone()
        if weights == "int8-dynamic":
            # the packed weights (and the bias) live in the quantized engine's own object
            self.packed = packed_int8_linear(weight, bias)
            bias = None
        elif weights == "int8":
            int8, scale = int8_per_channel(weight)
            self.register_buffer("weight", int8)
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("weight", weight.t().contiguous().to(getattr(torch, weights)))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights == "int8-dynamic":
            # reduce_range: 7-bit inputs, so the int16 sums cannot overflow without VNNI
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.size(-1)).float(),
                                                   self.packed, True)
        elif self.weights == "int8":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).float(), self.weight,
                                          self.scale)
        else:
            y = torch.matmul(x.to(self.weight.dtype), self.weight)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output channel), symmetric: each row's largest
    magnitude maps to 127."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12).float() / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def packed_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """The weight as int8_per_channel gives it, packed for torch.ops.quantized.linear_dynamic."""
    int8, scale = int8_per_channel(weight)
    with warnings.catch_warnings():
        # torch marks quantized tensors deprecated; its packed linear still needs one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation")
        quantized = torch._make_per_channel_quantized_tensor(
            int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.float())


def prepared_for_decoding(model: LanguageModel, weights: DecodeWeights = "float32"
                          ) -> LanguageModel:
    """A copy of the model for generation only, every matrix product laid out by DecodeLinear:
    the same function (float32), or smaller weights (bfloat16, int8, int8-dynamic)."""
    return with_linears_replaced(model, lambda weight, bias: DecodeLinear(weight, bias, weights))


def with_linears_replaced(
    model: LanguageModel,
    replacement: Callable[[nn.Parameter, nn.Parameter | None], nn.Module],
) -> LanguageModel:
    """An eval copy of the model with every nn.Linear replaced by replacement(weight, bias),
    and the output layer too (decode_head): a tied head is the embedding, which stays an
    embedding, so the head gets its own module over the embedding's weight."""
    copied = copy.deepcopy(model).eval()
    linears = [(name, module) for name, module in copied.named_modules()
               if isinstance(module, nn.Linear)]
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        setattr(copied.get_submodule(parent_name), attribute,
                replacement(linear.weight, linear.bias))
    copied.decode_head = (replacement(copied.token_embedding.weight, None)
                          if model.config.tie_embeddings else copied.lm_head)
    return copied


def streamed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                       is_causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, except that inside a compiled graph one query over the
    cache is written as sums: inductor fuses them into one pass over the keys and one over the
    values, where a call to the CPU's SDPA kernel costs more than one query's arithmetic."""
    if (torch.compiler.is_compiling() and q.size(-2) == 1 and attn_mask is not None
            and dropout_p == 0.0):
        scores = (q * k).sum(dim=-1, keepdim=True) / math.sqrt(q.size(-1))  # (B, H, keys, 1)
        scores = scores.masked_fill(~attn_mask.mT, float("-inf"))
        return (torch.softmax(scores, dim=-2) * v).sum(dim=-2, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


class CompiledDecodeStep:
    """A model's forward through torch.compile for decode steps, with its weights frozen into
    the graph, every product in inductor's own C++ matrix kernels, and the cache position
    symbolic from the first step.

    Freezing makes the weights constants of the graph, which inductor packs once into the
    blocked layout of its C++ matrix kernels (its CPP GEMM template, which max_autotune turns
    on); on a 2-core AVX2 CPU those read the weights several times faster than the kernels
    behind F.linear for one sample or eight, in float32 and bfloat16 alike (BENCHMARKS.md), so
    aten's kernels are not timed against them, which would add seconds per shape to compiling.
    The graph's kernels are called from C++ (cpp_wrapper) rather than from Python, which took
    a quarter of a small model's step allocating and viewing its buffers.

    The template needs constant weights, so every call runs without autograd, which freezing
    requires. Dynamo reads three settings while it traces, so they cannot travel with the
    compile options: the freezing flag (to put the weights in the graph rather than among its
    inputs); the dynamic sources, which name the forward's cache.length so that the first step
    compiles one graph for every position instead of one for its own position, then a second,
    symbolic one at the next step; and automatic dynamic shapes, off so that a second batch
    size compiles a graph of its own size rather than one for any batch, which took a third
    longer to compile. They are set around the first step of each batch size, the steps that
    compile; later steps leave them alone: setting and restoring them around every step cost
    a small step a sixth of its time.
    A later step that needs another graph all the same (inputs of another dtype, say) fails
    to compile: the C++ kernels have no weights to pack. Only the weights' identity is
    checked before a step (weight_identity_checks_only): switched to training, say, the copy's
    steps still decode.
    """

    CACHE_POSITION = "L['cache'].length"  # the forward's argument `cache`, as Dynamo names it

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = torch.compile(forward, options={
            "max_autotune": True,
            "max_autotune_gemm_backends": "CPP",
            "cpp_wrapper": True,
            "guard_filter_fn": weight_identity_checks_only,
            # inductor's graph cache gave a bfloat16 step the packed weights of an earlier
            # model of the same shape (torch 2.13), on disk too, and saved float32 nothing:
            # each step's graph is lowered anew, its C++ still built once and kept on disk
            "fx_graph_cache": False,
        })
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
        with (torch._inductor.config.patch(freezing=True),
              torch.compiler.config.patch(dynamic_sources=self.CACHE_POSITION),
              torch._dynamo.config.patch(automatic_dynamic_shapes=False)):
            output = self.forward(idx, cache=cache)
        self.compiled_batch_sizes.add(idx.size(0))
        return output


def weight_identity_checks_only(checks: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's checks to run before each compiled step: on the modules, only that
    each weight is the same tensor, which tells two models apart (their graphs hold their
    weights); its other checks of the modules (types, settings, attributes: hundreds of
    them) cost a small step a tenth of its time, and a copy made for decoding never changes
    them. The checks on the step's inputs and the cache all stay."""
    return [check.guard_type == "ID_MATCH"
            or not check.orig_guard.source.is_unspecialized_nn_module() for check in checks]


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


def compiled_for_decoding(model: LanguageModel, weights: DecodeWeights = "float32"
                          ) -> LanguageModel:
    """An eval copy of the model whose cached one-token steps run through CompiledDecodeStep,
    the one query's attention written as sums (streamed_attention); with bfloat16 weights the
    steps read bfloat16 copies of the matrices (BFloat16StepLinear). Prefills stay eager, with
    the float32 weights. The first step of a batch size compiles its graph, which every later
    step of that batch size reuses, whatever its position. Compiling takes 15-20 s on a
    2-core CPU, so it pays for long generations (BENCHMARKS.md). The step packs its own
    copies of the matrices when it compiles: change the weights, and compile a new copy."""
    if weights == "float32":
        compiled = copy.deepcopy(model).eval()
    elif weights == "bfloat16":
        compiled = with_linears_replaced(model, BFloat16StepLinear)
    else:
        raise ValueError(f"compiled decoding takes float32 or bfloat16 weights, not {weights}")
    for block in compiled.blocks:
        block.attn.attend = streamed_attention
    compiled.compiled_step = CompiledDecodeStep(compiled.forward)
    return compiled
