"""The optimizer and the learning-rate schedule a TrainConfig asks for.

    optimizer = build_optimizer(model, cfg, device)    # AdamW, or Muon + AdamW as one
    scheduler = build_scheduler(optimizer, cfg)         # every group: peak rate x lr_factor

With optimizer=muon, Muon (torch.optim.Muon's algorithm, state and settings; see Muon below)
takes the 2-D weight matrices inside the blocks and AdamW the rest (embeddings, head, gains,
biases): Muon orthogonalises each matrix's update, which only makes sense for a hidden layer's
weights. Every group follows one schedule: its peak learning rate times lr_factor(step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from utils import private_torch
from utils.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW for every parameter, or Muon for the blocks' weight matrices and AdamW for the
    rest. AdamW's learning rate is embedding_lr for the embeddings, head_lr for an untied head
    and learning_rate for the rest; its weight decay skips gains and biases."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    use_muon = cfg.optimizer == "muon"
    hidden = [p for name, p in named if use_muon and is_hidden_matrix(name, p)]
    hidden_ids = {id(p) for p in hidden}
    adamw = torch.optim.AdamW(
        adamw_groups([(name, p) for name, p in named if id(p) not in hidden_ids], cfg),
        lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu", "mps"))
    if not use_muon:
        return adamw
    muon = Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.muon_weight_decay, neuron_beta2=cfg.normuon_beta2,
                orthogonalize_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return MuonWithAdamW(muon, adamw)


def adamw_groups(named: list[tuple[str, torch.nn.Parameter]],
                 cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's param groups: matrices (decayed) and gains and biases (not) at learning_rate,
    then the embeddings at embedding_lr and an untied head at head_lr where those are set.
    Leaving both unset gives the two groups checkpoints of earlier versions hold."""
    own_lr = {"embedding": cfg.embedding_lr, "head": cfg.head_lr}
    parts: dict[str, list[torch.nn.Parameter]] = {
        "matrices": [], "vectors": [], "embedding": [], "head": []}
    for name, param in named:
        if name.endswith("embedding.weight") and own_lr["embedding"] is not None:
            parts["embedding"].append(param)
        elif name == "lm_head.weight" and own_lr["head"] is not None:
            parts["head"].append(param)
        else:
            parts["matrices" if param.dim() >= 2 else "vectors"].append(param)
    groups = [{"params": parts["matrices"], "weight_decay": cfg.weight_decay},
              {"params": parts["vectors"], "weight_decay": 0.0}]
    for part, lr in own_lr.items():
        if parts[part]:
            groups.append({"params": parts[part], "lr": lr, "weight_decay": cfg.weight_decay})
    return groups


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A weight matrix inside a transformer block: what Muon updates."""
    return name.startswith("blocks.") and param.dim() == 2


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration in orthogonalize_dtype and over every
    matrix of one shape at once, and optionally NorMuon's per-neuron normalisation.

    torch's own step orthogonalises in bfloat16, one matrix at a time. A CPU without native
    bfloat16 matrix products (AVX2 only) runs those far slower than float32, enough for Muon to
    take most of a default training step there (BENCHMARKS.md, Profiling); on a GPU each
    matrix's many small kernels are launched from the host one by one. The algorithm, the
    settings, the param groups and the state (one momentum buffer per matrix) are torch's, so
    checkpoints are too.

    With neuron_beta2 set (NorMuon, Li et al. 2025), each row of an orthogonalised update (one
    output neuron) is divided by the RMS of that row's recent updates, an average with decay
    neuron_beta2 kept in the state as `neuron_second_moment`, and the update is then scaled back
    to its own norm: the neurons step evenly and the matrix keeps Muon's step size, so the
    learning rate means the same (BENCHMARKS.md measures what it is worth).
    """

    def __init__(self, params: Any, *, orthogonalize_dtype: torch.dtype,
                 neuron_beta2: float | None = None, **settings: Any) -> None:
        super().__init__(params, **settings)
        self.orthogonalize_dtype = orthogonalize_dtype
        self.neuron_beta2 = neuron_beta2

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for param in group["params"]:
                if param.grad is not None:
                    by_shape.setdefault(param.shape, []).append(param)
            for shape, params in by_shape.items():
                self._step_same_shape(group, shape, params)

    def _step_same_shape(self, group: dict[str, Any], shape: torch.Size,
                         params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        buffers = []
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad)
            buffers.append(state["momentum_buffer"])
        momentum = group["momentum"]
        private_torch.foreach_lerp_(buffers, grads, 1 - momentum)
        updates = (private_torch.foreach_lerp(grads, buffers, momentum) if group["nesterov"]
                   else buffers)
        orthogonal = orthogonalize(torch.stack(updates), group["ns_coefficients"],
                                   group["ns_steps"], group["eps"], self.orthogonalize_dtype)
        if self.neuron_beta2 is not None:
            orthogonal = self._even_out_neurons(params, orthogonal.float())
        lr = group["lr"]
        if group["weight_decay"]:
            private_torch.foreach_mul_(params, 1 - lr * group["weight_decay"])
        private_torch.foreach_add_(params, list(orthogonal.to(params[0].dtype).unbind(0)),
                                   alpha=-lr * shape_lr_ratio(shape, group["adjust_lr_fn"]))

    def _even_out_neurons(self, params: list[torch.Tensor], orthogonal: torch.Tensor
                          ) -> torch.Tensor:
        """NorMuon's step for the orthogonalised updates (k, rows, columns) of params."""
        mean_squares = orthogonal.square().mean(dim=-1, keepdim=True)  # (k, rows, 1)
        moments = []
        for param, new in zip(params, mean_squares.unbind(0), strict=True):
            state = self.state[param]
            if "neuron_second_moment" in state:
                state["neuron_second_moment"].lerp_(new, 1 - self.neuron_beta2)
            else:  # the first update's own mean squares: its rows come out even at once
                state["neuron_second_moment"] = new.clone()
            moments.append(state["neuron_second_moment"])
        evened = orthogonal * torch.stack(moments).clamp(min=1e-10).rsqrt()
        norm = orthogonal.norm(dim=(-2, -1), keepdim=True)
        return evened * (norm / evened.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))


def orthogonalize(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's approximation of U V^T for each matrix U S V^T of updates (k, m, n), in
    dtype: torch.optim.Muon's quintic iteration, batched."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrices are then the smaller ones
        x = x.mT
    # the Frobenius norm bounds the spectral norm, which the iteration needs at most 1
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def shape_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate multiplier for a (rows, columns) matrix."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer, so the scheduler, GradScaler, checkpoints and
    resume see one set of param groups and one state_dict, as with AdamW alone.

    The two keep this optimizer's group dicts and state as their own: a learning rate the
    scheduler sets, or state a checkpoint loads, is what they step with."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.parts = (muon, adamw)
        super().__init__([group for part in self.parts for group in part.param_groups], {})
        self._share_with_parts()

    def _share_with_parts(self) -> None:
        start = 0
        for part in self.parts:
            count = len(part.param_groups)
            part.param_groups = self.param_groups[start:start + count]
            part.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for part in self.parts:
            part.step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # makes new group dicts and a new state
        self._share_with_parts()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_done: int = 0) -> LambdaLR:
    """cfg's schedule over every group of the optimizer. With steps_done, it takes over from
    another schedule: each group's rate becomes its peak times lr_factor(steps_done)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg), last_epoch=steps_done - 1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Every group's learning rate at optimizer step `step`, as a fraction of its peak: linear
    warmup, then cosine decay, or wsd's constant phase and linear decay over the last
    decay_fraction of the steps; min_lr / learning_rate at the end and after."""
    floor = cfg.min_lr / cfg.learning_rate
    end = cfg.decay_end_step
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    if step >= end:
        return floor
    if cfg.schedule == "wsd":
        decay_start = wsd_decay_start(end, cfg)
        if step < decay_start:
            return 1.0
        remaining = (end - step) / max(1, end - decay_start)  # 1 -> 0 over the decay
        return floor + remaining * (1.0 - floor)
    progress = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0 over the decay
    return floor + cosine * (1.0 - floor)


def wsd_decay_start(end: int, cfg: TrainConfig) -> int:
    """The first step of wsd's linear decay, for a decay that ends at step `end`."""
    return max(cfg.warmup_iters, end - round(cfg.decay_fraction * end))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """AdamW's learning rate at optimizer step `step`."""
    return cfg.learning_rate * lr_factor(step, cfg)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, is_finite: torch.Tensor) -> None:
    """Apply the update only if is_finite, deciding on the device when the optimizer can."""
    if optimizer.defaults.get("fused"):
        # fused Adam(W) skips its whole update (moments, decay, step count) on the device when
        # found_inf is non-zero: the hook GradScaler uses, so the host never waits
        optimizer.found_inf = (~is_finite).float()
        optimizer.step()
    elif bool(is_finite):  # the one host-device sync, for optimizers without that hook (Muon)
        optimizer.step()
