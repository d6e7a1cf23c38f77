"""Every call into a private or internal torch API, behind one gate.

The fast decoding paths and Muon's batched updates use torch functions that are not public
API, which any release may rename or drop. They are called here and nowhere else. The module
names the torch releases it was tested with, and a feature is open only on such a release with
every name it needs present. Each caller keeps a portable path for a closed feature: decoding
without the compiled step or the int8 kernels, plain per-tensor optimizer updates.

    if private_torch.is_open("int8"):
        y = private_torch.int8_weight_matmul(x, weight, scale)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

TESTED_TORCH_RELEASES = ("2.13",)

Feature = Literal["compiled-decoding", "int8", "int8-dynamic", "foreach"]

REQUIRED_NAMES: dict[Feature, tuple[str, ...]] = {
    "compiled-decoding": (
        "torch._inductor.config.freezing", "torch._inductor.config.max_autotune",
        "torch._inductor.config.max_autotune_gemm_backends", "torch._inductor.config.cpp_wrapper",
        "torch._inductor.config.fx_graph_cache", "torch._dynamo.config.automatic_dynamic_shapes",
        "torch._dynamo.config.error_on_recompile", "torch._dynamo.reset",
        "torch.compiler.config.dynamic_sources", "torch._guards.Guard.source",
        "torch._guards.GuardSource.is_unspecialized_nn_module",
    ),
    "int8": ("torch._weight_int8pack_mm",),
    "int8-dynamic": (
        "torch._make_per_channel_quantized_tensor", "torch.ops.quantized.linear_prepack",
        "torch.ops.quantized.linear_dynamic",
    ),
    "foreach": ("torch._foreach_lerp_", "torch._foreach_lerp", "torch._foreach_mul_",
                "torch._foreach_add_"),
}
# Dynamo's guard type for "this object is the same object", which checks a weight's identity
WEIGHT_IDENTITY_GUARD = "ID_MATCH"


def torch_release() -> str:
    """The running torch's major.minor release, such as "2.13"."""
    return ".".join(str(torch.__version__).split("+")[0].split(".")[:2])


def closed_reason(feature: Feature) -> str | None:
    """None when the feature is open; otherwise why not, naming the torch found and the
    releases tested."""
    found, tested = torch.__version__, ", ".join(TESTED_TORCH_RELEASES)
    if torch_release() not in TESTED_TORCH_RELEASES:
        return (f"its private torch calls were tested with torch {tested} only, and this is "
                f"torch {found}")
    missing = [name for name in REQUIRED_NAMES[feature] if not has_name(name)]
    if missing:
        return f"torch {found} (tested: {tested}) lacks {', '.join(missing)}"
    return None


def is_open(feature: Feature) -> bool:
    return closed_reason(feature) is None


def require(feature: Feature) -> None:
    """Refuse a closed feature: callers check is_open first and take the portable path."""
    reason = closed_reason(feature)
    if reason is not None:
        raise RuntimeError(f"{feature} is closed: {reason}")


@functools.cache
def has_name(dotted: str) -> bool:
    """Whether torch has the dotted name, importing the submodules it passes through."""
    found: Any = torch
    path = "torch"
    for part in dotted.split(".")[1:]:
        path = f"{path}.{part}"
        if isinstance(found, types.ModuleType) and not hasattr(found, part):
            with contextlib.suppress(ImportError):
                importlib.import_module(path)
        try:
            found = getattr(found, part)
        except (AttributeError, RuntimeError):
            return False
    return True


# int8 weights ------------------------------------------------------------------------------

def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """x (N, in) float32 times the (out, in) int8 weight's transpose, each output channel
    times its float32 scale: torch's weight-only int8 CPU kernel."""
    return torch._weight_int8pack_mm(x, weight, scale)


def packed_int8_linear(weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> Any:
    """The (out, in) int8 weight with one scale per output channel, and the bias, packed for
    dynamic_int8_linear by torch's quantized engine (FBGEMM on x86)."""
    with warnings.catch_warnings():
        # torch marks quantized tensors deprecated; its packed linear still needs one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation")
        quantized = torch._make_per_channel_quantized_tensor(
            weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.float())


def dynamic_int8_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x (N, in) float32 through the packed layer, x rounded to int8 with one scale per call;
    reduce_range gives 7-bit inputs, so the int16 sums cannot overflow without VNNI."""
    return torch.ops.quantized.linear_dynamic(x, packed, True)


# compiled decoding -------------------------------------------------------------------------

def compile_with_frozen_weights(forward: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of forward with every matrix product in inductor's packed C++ matrix
    kernels (its CPP GEMM template, which max_autotune turns on), which need the weights
    frozen into the graph (frozen_weight_settings), and the kernels called from C++
    (cpp_wrapper) rather than from Python, which spent a small model's step allocating and
    viewing buffers. Before each call only the weights' identity is checked among the modules'
    attributes (weight_identity_checks_only)."""
    return torch.compile(forward, options={
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP",
        "cpp_wrapper": True,
        "guard_filter_fn": weight_identity_checks_only,
        # inductor's graph cache gave a step the packed weights of an earlier model of the
        # same shape (torch 2.13), on disk too: each graph is lowered anew, and its C++ is
        # built anew as well (the source names each frozen constant's address)
        "fx_graph_cache": False,
    })


@contextlib.contextmanager
def frozen_weight_settings(dynamic_attribute: str) -> Iterator[None]:
    """The settings Dynamo reads while it traces, so they cannot travel with the compile
    options, for the call that compiles: the weights frozen into the graph rather than among
    its inputs; dynamic_attribute ("argument.attribute", an int) symbolic from the first
    graph rather than one graph per value; and automatic dynamic shapes off, so a new input
    shape compiles a graph of its own size rather than one for any size."""
    argument, attribute = dynamic_attribute.split(".")
    with (torch._inductor.config.patch(freezing=True),
          torch.compiler.config.patch(dynamic_sources=f"L['{argument}'].{attribute}"),
          torch._dynamo.config.patch(automatic_dynamic_shapes=False)):
        yield


def weight_identity_checks_only(checks: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's checks to run before each compiled call: on the modules, only that
    each weight is the same tensor, which tells two models of one shape apart (their graphs
    hold their weights); the other checks of the modules (types, settings, attributes) cost a
    small step a noticeable share of its time, and a copy made for decoding never changes
    them. The checks on the inputs all stay.

    If no check has the identity type this was written for (a torch that renamed it), every
    check stays: slower, but never a graph with another model's weights."""
    if not any(getattr(check, "guard_type", None) == WEIGHT_IDENTITY_GUARD for check in checks):
        return [True] * len(checks)
    return [check.guard_type == WEIGHT_IDENTITY_GUARD or not is_module_attribute_check(check)
            for check in checks]


def is_module_attribute_check(check: Any) -> bool:
    """Whether the check reads an attribute of an nn.Module; one of a shape it does not know
    counts as not, so it stays."""
    source = getattr(getattr(check, "orig_guard", None), "source", None)
    is_module = getattr(source, "is_unspecialized_nn_module", None)
    return is_module is not None and bool(is_module())


def reset_compiled_graphs() -> None:
    """Forget every graph compiled so far: Dynamo counts the graphs of one function together
    (model.forward, for every model) and stops compiling past its limit."""
    torch._dynamo.reset()


@contextlib.contextmanager
def recompiles_refused() -> Iterator[type[Exception]]:
    """For tests: inside, a compile of a function that has a graph already raises the
    exception type yielded."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield torch._dynamo.exc.RecompileError


# batched optimizer updates -----------------------------------------------------------------
# torch's foreach ops update a list of tensors in one call (one kernel launch on a GPU); the
# portable path makes the same per-tensor calls, which give the same values

def foreach_lerp_(tensors: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
    if is_open("foreach"):
        torch._foreach_lerp_(tensors, ends, weight)
    else:
        for tensor, end in zip(tensors, ends, strict=True):
            tensor.lerp_(end, weight)


def foreach_lerp(tensors: list[torch.Tensor], ends: list[torch.Tensor],
                 weight: float) -> list[torch.Tensor]:
    if is_open("foreach"):
        return list(torch._foreach_lerp(tensors, ends, weight))
    return [tensor.lerp(end, weight) for tensor, end in zip(tensors, ends, strict=True)]


def foreach_mul_(tensors: list[torch.Tensor], factor: float) -> None:
    if is_open("foreach"):
        torch._foreach_mul_(tensors, factor)
    else:
        for tensor in tensors:
            tensor.mul_(factor)


def foreach_add_(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float) -> None:
    if is_open("foreach"):
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        for tensor, other in zip(tensors, others, strict=True):
            tensor.add_(other, alpha=alpha)
