"""The gate around private torch (utils/private_torch.py): which features it opens, the
guard filter that keeps models apart, and the optimizer's portable path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from utils import private_torch
from utils.optimizers import Muon


def test_a_feature_is_open_only_on_a_tested_torch_with_every_name_it_needs(monkeypatch):
    monkeypatch.setattr(private_torch, "TESTED_TORCH_RELEASES", (private_torch.torch_release(),))
    assert private_torch.is_open("foreach")
    monkeypatch.setitem(private_torch.REQUIRED_NAMES, "foreach",
                        ("torch._foreach_add_", "torch._no_such_kernel"))
    assert private_torch.closed_reason("foreach") == (
        f"torch {torch.__version__} (tested: {private_torch.torch_release()}) lacks "
        "torch._no_such_kernel")
    monkeypatch.setattr(private_torch, "TESTED_TORCH_RELEASES", ("1.0",))
    assert private_torch.closed_reason("int8") == (
        f"its private torch calls were tested with torch 1.0 only, and this is torch "
        f"{torch.__version__}")
    with pytest.raises(RuntimeError, match="int8 is closed: its private torch calls"):
        private_torch.require("int8")


def test_has_name_finds_attributes_of_submodules_and_ops():
    assert private_torch.has_name("torch._inductor.config.freezing")
    assert private_torch.has_name("torch.ops.quantized.linear_dynamic")
    assert not private_torch.has_name("torch._inductor.config.no_such_setting")
    assert not private_torch.has_name("torch.ops.quantized.no_such_op")
    assert not private_torch.has_name("torch.no_such_module.anything")


def fake_check(guard_type: str, on_module: bool) -> SimpleNamespace:
    """One of Dynamo's guard entries as the filter reads it."""
    source = SimpleNamespace(is_unspecialized_nn_module=lambda: on_module)
    return SimpleNamespace(guard_type=guard_type, orig_guard=SimpleNamespace(source=source))


def test_the_guard_filter_keeps_weight_identity_and_input_checks():
    checks = [fake_check("ID_MATCH", on_module=True), fake_check("TYPE_MATCH", on_module=True),
              fake_check("TENSOR_MATCH", on_module=False),
              SimpleNamespace(guard_type="EQUALS_MATCH")]  # a shape it does not know: kept
    assert private_torch.weight_identity_checks_only(checks) == [True, False, True, True]


def test_the_guard_filter_keeps_every_check_when_none_has_the_identity_type():
    """A torch that renamed the identity check: dropping the module checks would let two
    models of one shape share a graph, so every check stays."""
    checks = [fake_check("OBJECT_ID_MATCH", on_module=True),
              fake_check("TYPE_MATCH", on_module=True)]
    assert private_torch.weight_identity_checks_only(checks) == [True, True]


def muon_steps(monkeypatch, tested: tuple[str, ...]) -> list[torch.Tensor]:
    """Parameters after a few Muon steps (Nesterov, weight decay, NorMuon) on fixed grads."""
    monkeypatch.setattr(private_torch, "TESTED_TORCH_RELEASES", tested)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator))
              for shape in [(8, 16), (8, 16), (16, 8)]]
    optimizer = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True,
                     orthogonalize_dtype=torch.float32, neuron_beta2=0.95)
    for _ in range(3):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return [p.detach().clone() for p in params] + [
        state["momentum_buffer"] for state in optimizer.state.values()]


def test_muon_without_foreach_ops_takes_the_same_steps(monkeypatch):
    """The portable path's per-tensor ops give the foreach ops' values exactly, so a run
    resumes bit-exactly on either."""
    batched = muon_steps(monkeypatch, (private_torch.torch_release(),))
    assert private_torch.is_open("foreach")
    portable = muon_steps(monkeypatch, ("1.0",))
    assert not private_torch.is_open("foreach")
    assert all(torch.equal(a, b) for a, b in zip(batched, portable, strict=True))
