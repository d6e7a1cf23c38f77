"""utils/optimizers.py's Muon: torch.optim.Muon's algorithm, batched, in a dtype the device
multiplies fast."""

from __future__ import annotations

import pytest
import torch

from model import LanguageModel
from utils.config import TrainConfig
from utils.optimizers import Muon, build_optimizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_steps_as_torch_muon_does(dtype):
    """The same updates as torch.optim.Muon (which orthogonalises in bfloat16, one matrix at a
    time), with matrices of several shapes batched together: equal up to bfloat16's rounding,
    which five Newton-Schulz steps grow to ~2% (batched and single products may round apart
    on CPUs with native bfloat16)."""
    tolerance = 5e-2
    shapes = [(24, 8), (8, 8), (8, 32), (24, 8), (8, 32)]

    def parameters() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]

    ours, reference = parameters(), parameters()
    settings = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    optimizers = [Muon(ours, orthogonalize_dtype=dtype, **settings),
                  torch.optim.Muon(reference, **settings)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for mine, theirs in zip(ours, reference, strict=True):
            mine.grad = torch.randn(mine.shape, generator=generator)
            theirs.grad = mine.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for mine, theirs, start in zip(ours, reference, parameters(), strict=True):
        moved = (theirs - start).abs().max()
        assert (mine - theirs).abs().max() <= tolerance * moved


def test_muon_orthogonalises_in_float32_on_the_cpu(tiny_config):
    """bfloat16 matrix products are far slower than float32 on a CPU without native bfloat16
    (AVX2), where torch's own Muon spent most of a default step (BENCHMARKS.md)."""
    optimizer = build_optimizer(LanguageModel(tiny_config), TrainConfig(optimizer="muon"),
                                torch.device("cpu"))
    assert optimizer.parts[0].orthogonalize_dtype == torch.float32


def test_normuon_evens_out_each_neurons_update_and_keeps_muons_step_size():
    """NorMuon (neuron_beta2): every row of the first update has the same RMS, the update has
    plain Muon's norm, and the per-row averages are optimizer state, which checkpoints hold."""
    start = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    moves = {}
    for beta2 in (None, 0.95):
        param = torch.nn.Parameter(start.clone())
        param.grad = grad.clone()
        optimizer = Muon([param], orthogonalize_dtype=torch.float32, neuron_beta2=beta2, lr=0.1,
                         weight_decay=0.0)
        optimizer.step()
        moves[beta2] = (param - start).detach()
        state_keys = set(optimizer.state_dict()["state"][0])
    plain_rows = moves[None].square().mean(dim=1)
    assert plain_rows.max() > 1.5 * plain_rows.min()  # orthogonalised, a tall matrix: uneven rows
    even_rows = moves[0.95].square().mean(dim=1)
    torch.testing.assert_close(even_rows, even_rows.mean().expand(24), rtol=1e-4, atol=0)
    torch.testing.assert_close(moves[0.95].norm(), moves[None].norm(), rtol=1e-5, atol=0)
    assert state_keys == {"momentum_buffer", "neuron_second_moment"}


def test_the_default_run_uses_normuon_and_the_config_can_turn_it_off(tiny_config):
    cpu = torch.device("cpu")
    model = LanguageModel(tiny_config)
    assert build_optimizer(model, TrainConfig(), cpu).parts[0].neuron_beta2 == 0.95
    assert build_optimizer(model, TrainConfig(normuon_beta2=None), cpu).parts[0].neuron_beta2 \
        is None
