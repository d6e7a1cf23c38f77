"""The training step and the evaluation, shared by train.py, profile_model.py and bench/: what
one of them measures is what another runs.

    state = init_state(setup)               # model, optimizer, schedule, batches; seeded
    result = optimizer_step(state, setup)   # one step; nothing waits for the device
    losses = estimate_loss(state.step_model, setup)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.autograd.profiler import record_function
from tqdm import tqdm

from data import BatchSampler, windows_at
from generation import generate
from model import LanguageModel
from utils import console, distributed
from utils.checkpoint import TrainingState
from utils.config import TrainConfig
from utils.device import peak_flops
from utils.optimizers import build_optimizer, build_scheduler, lr_at, step_unless_nonfinite
from utils.setup import Setup
from utils.tracking import Tracker

# evaluation batches come from their own fixed seed, so every evaluation sees the same windows
# and the training batch stream is the same whether or not (and how often) we evaluate
EVAL_SEED_OFFSET = 1_000_003
# the fewest tokens in one forward call of the full-split pass (whole windows): on a 2-core CPU
# 4-8k tokens a call scored fastest, both for a 2-layer 32-wide and the default model; a
# training batch larger than this is used whole, as it fits the device
FULL_SPLIT_MIN_TOKENS_PER_CALL = 2**12


def init_state(setup: Setup) -> TrainingState:
    """A fresh model, optimizer, schedule and batch stream, seeded for this process."""
    cfg = setup.config.train
    # each rank draws its own batches and dropout masks; DDP gives every rank rank 0's weights
    seed_everything(cfg.seed + distributed.rank())
    model = LanguageModel(setup.config.model).to(setup.device)
    return TrainingState(model=model, step_model=torch.compile(model) if cfg.compile else model,
                         **optimization(model, setup))


def optimization(model: LanguageModel, setup: Setup) -> dict[str, Any]:
    """A fresh optimizer, schedule, loss scaler and batch stream for the model."""
    cfg = setup.config.train
    optimizer = build_optimizer(model, cfg, setup.device)
    return dict(
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg),
        scaler=torch.amp.GradScaler(setup.device.type, enabled=setup.dtype == torch.float16),
        batches=BatchSampler(setup.splits.train, setup.config.model.block_size, cfg.batch_size,
                             cfg.seed + distributed.rank(), setup.device, cfg.sampling),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


@dataclass(frozen=True)
class StepResult:
    """What one step leaves on the device; reading any of it waits for the device."""

    loss: torch.Tensor  # mean loss over the micro-batches
    grad_norm: torch.Tensor  # global gradient norm before clipping
    is_finite: torch.Tensor  # bool; False: the update was skipped
    learning_rate: float  # AdamW's base learning rate for the step; other groups scale with it


def optimizer_step(state: TrainingState, setup: Setup) -> StepResult:
    """One optimizer step over grad_accum_steps micro-batches, skipped if anything is non-finite.

    Nothing here waits for the device (with a fused optimizer), so the host queues the next
    step while this one runs. The named ranges are the phases profile_model.py reports.
    """
    cfg, optimizer, scaler = setup.config.train, state.optimizer, state.scaler
    with record_function("optimizer"):
        # zeroed here rather than after the update, so the step's gradients can be inspected
        optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=setup.device)
    for micro_step in range(cfg.grad_accum_steps):
        with record_function("data"):
            x, y = state.batches.next_batch()
        # under DDP, gradients are averaged over ranks in the last micro-step's backward only
        last = micro_step == cfg.grad_accum_steps - 1
        with distributed.gradient_sync(state.step_model, enabled=last):
            with record_function("forward"), setup.autocast():
                _, loss = state.step_model(x, y)
                # grads are summed over micro-steps, so scale each loss to keep the mean
                loss = loss / cfg.grad_accum_steps
            with record_function("backward"):
                scaler.scale(loss).backward()
        total_loss += loss.detach()
    with record_function("optimizer"):
        # averaged over ranks: a non-finite loss on any rank makes the mean non-finite, so
        # every rank skips the same steps and the replicas never diverge
        total_loss = distributed.mean_over_ranks(total_loss)
        scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
        is_finite = torch.isfinite(total_loss) & torch.isfinite(grad_norm)
        if scaler.is_enabled():
            # float16: the GradScaler skips overflowing steps itself and lowers its scale
            scaler.step(optimizer)
        else:
            step_unless_nonfinite(optimizer, is_finite)
        scaler.update()
    return StepResult(total_loss, grad_norm, is_finite, lr_at(state.step, cfg))


@dataclass(frozen=True)
class Due:
    """What the loop does after a step, by the intervals in the config."""

    log: bool
    evaluation: bool
    checkpoint: bool
    histograms: bool

    @classmethod
    def at(cls, step: int, cfg: TrainConfig) -> Due:
        last = step == cfg.max_iters
        return cls(
            log=step % cfg.log_interval == 0 or last,
            evaluation=step % cfg.eval_interval == 0 or last,
            checkpoint=bool(cfg.checkpoint_interval) and step % cfg.checkpoint_interval == 0,
            histograms=bool(cfg.histogram_interval) and step % cfg.histogram_interval == 0,
        )

    @property
    def sync_point(self) -> bool:
        """A step where the loop waits for the device anyway, to read a loss or save."""
        return self.log or self.evaluation or self.checkpoint


class SpeedMeter:
    """Tokens/s and MFU over the steps since the last restart."""

    def __init__(self, setup: Setup, model: LanguageModel) -> None:
        self.tokens_per_step = setup.tokens_per_step()
        self.flops_per_token = model.flops_per_token()
        # every process measures its own share of the machine; MFU is over all of them
        peak = setup.config.train.peak_flops or peak_flops(setup.device, setup.dtype)
        self.peak_flops = peak * distributed.world_size()
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def rates(self) -> tuple[float, float]:
        """(tokens per second, model FLOPs utilisation) since the restart."""
        tokens_per_sec = self.steps * self.tokens_per_step / (time.perf_counter() - self.start)
        return tokens_per_sec, self.flops_per_token * tokens_per_sec / self.peak_flops


def log_progress(state: TrainingState, result: StepResult, speed: SpeedMeter, tracker: Tracker,
                 progress: tqdm) -> None:
    """The step's loss, gradient norm, learning rate and speed, to the tracker and the bar."""
    tokens_per_sec, mfu = speed.rates()
    metrics = {"train/loss": result.loss.item(), "grad_norm": result.grad_norm.item(),
               "lr": result.learning_rate, "tokens_per_sec": tokens_per_sec,
               "mfu": mfu}
    tracker.log(metrics, state.step)
    val = f"{state.last_losses['val']:.4f}" if state.last_losses else "-"
    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", val=val, lr=f"{metrics['lr']:.2e}",
                         tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{mfu:.0%}")
    speed.restart()


def evaluate(state: TrainingState, setup: Setup, tracker: Tracker) -> bool:
    """Losses on both splits and a sample, logged at the current step; True if val improved."""
    cfg = setup.config.train
    if cfg.eval_full:
        losses = estimate_loss(state.step_model, setup, splits=("train",))
        losses["val"] = full_split_loss(state.step_model, setup)
    else:
        losses = estimate_loss(state.step_model, setup)
    improved = losses["val"] < state.best_val_loss
    if losses["val"] < state.best_val_loss - cfg.min_delta:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    state.last_losses = losses
    tracker.log({"train/loss_eval": losses["train"], "val/loss": losses["val"],
                 "val/bpc": bits_per_character(losses["val"]),
                 "val/perplexity": math.exp(losses["val"])}, state.step)
    if cfg.sample_tokens and distributed.is_main_process():
        state.last_sample = (state.step, sample_text(state.model, setup, cfg.sample_tokens))
        tracker.log_text("samples", state.last_sample[1], state.step)
    console.info(f"step {state.step}: train loss {losses['train']:.4f}, "
                 f"val loss {losses['val']:.4f}{' (full split)' if cfg.eval_full else ''}")
    return improved


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, setup: Setup,
                  splits: Sequence[str] = ("train", "val")) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches of each split, in eval mode.

    Under torchrun each rank evaluates its own batches and the means are averaged, so the
    estimate rests on eval_iters x world_size batches."""
    cfg, block_size = setup.config.train, setup.config.model.block_size
    model.eval()
    losses = {}
    seed = cfg.seed + EVAL_SEED_OFFSET + distributed.rank()
    for name in splits:
        data = setup.splits.train if name == "train" else setup.splits.val
        sampler = BatchSampler(data, block_size, cfg.batch_size, seed, setup.device)
        total = torch.zeros((), device=setup.device)
        for _ in range(cfg.eval_iters):
            x, y = sampler.next_batch()
            with setup.autocast():
                _, loss = model(x, y)
            total += loss
        losses[name] = distributed.mean_over_ranks(total).item() / cfg.eval_iters
    model.train()
    return losses


@torch.no_grad()
def full_split_loss(model: torch.nn.Module, setup: Setup) -> float:
    """Mean loss over every non-overlapping block_size window of the val split: a figure
    that compares across runs, unlike a sample of random windows. Ranks share the windows."""
    cfg, block_size, data = setup.config.train, setup.config.model.block_size, setup.splits.val
    starts = torch.arange(full_split_windows(setup)) * block_size
    totals = torch.zeros(2, device=setup.device)  # summed loss, windows
    # batched by tokens as well as by the training batch: with a small batch the pass would
    # otherwise be thousands of short forward calls (3,906 for 1M tokens at batch size 1)
    windows_per_call = max(cfg.batch_size, FULL_SPLIT_MIN_TOKENS_PER_CALL // block_size)
    model.eval()
    for batch in starts[distributed.rank()::distributed.world_size()].split(windows_per_call):
        windows = windows_at(data, batch, block_size + 1).to(setup.device)
        with setup.autocast():
            _, loss = model(windows[:, :-1], windows[:, 1:])
        totals[0] += loss.float() * len(batch)
        totals[1] += len(batch)
    model.train()
    totals = distributed.mean_over_ranks(totals)  # a ratio of means is the ratio of sums
    return (totals[0] / totals[1]).item()


def bits_per_character(loss: float) -> float:
    """A loss in nats per token as bits per character, the usual figure for character
    models (a token is a character here)."""
    return loss / math.log(2)


def run_results(state: TrainingState, setup: Setup, end_reason: str,
                trackers_lost: Mapping[str, str]) -> dict[str, Any]:
    """What a run achieved, for meta/results.json: its losses (also in bits per character;
    None where it has none, as when it stopped before an evaluation), how long it trained,
    why it ended, and any tracker that stopped taking its logs part way (an Aim server that
    went away), with why."""
    losses = {
        "final_val_loss": state.last_losses.get("val"),
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "full_split_val_loss": state.last_losses.get("val_full"),
    }
    bits = {name.replace("_loss", "_bpc"): None if loss is None else bits_per_character(loss)
            for name, loss in losses.items()}
    return {
        **losses, **bits,
        "full_split_val_tokens": full_split_windows(setup) * setup.config.model.block_size,
        "steps": state.step,
        "tokens": state.step * setup.tokens_per_step(),
        "training_seconds": round(state.training_seconds, 3),
        "end_reason": end_reason,
        "trackers_lost": dict(trackers_lost),
    }


def full_split_windows(setup: Setup) -> int:
    """How many block_size windows a full-split pass scores: all of the val split, up to
    full_split_max_tokens."""
    tokens = len(setup.splits.val) - 1
    if setup.config.train.full_split_max_tokens is not None:
        tokens = min(tokens, setup.config.train.full_split_max_tokens)
    return max(1, tokens // setup.config.model.block_size)


def sample_text(model: LanguageModel, setup: Setup, num_tokens: int) -> str:
    """A short sample from the model, starting from a newline when the vocabulary has one."""
    tokenizer = setup.tokenizer
    start = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
    prompt = torch.tensor([tokenizer.encode(start)], device=setup.device)
    generator = torch.Generator(device=setup.device).manual_seed(setup.config.train.seed)
    was_training = model.training
    model.eval()
    ids = generate(model, prompt, num_tokens, temperature=0.8, generator=generator)
    model.train(was_training)
    return tokenizer.decode(ids[0, 1:].tolist())
