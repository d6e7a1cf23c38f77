"""Train a character-level GPT on a text file, then export it for inference.py.

Usage: python train.py --run-tag baseline --batch-size 16
       python train.py --resume runs/<id>      # continue a stopped run from its last checkpoint
       torchrun --standalone --nproc_per_node=4 train.py ...   # DDP over 4 processes

Read top-down: main -> train (config, setup, time budget, run folder) -> fit (the loop, then
the export) -> training_loop -> optimizer_step, check_pace, evaluate, write_checkpoints -> small
helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.autograd.profiler import record_function
from tqdm import tqdm

from data import BatchSampler, windows_at
from model import LanguageModel
from utils import budget, console, distributed
from utils.checkpoint import (
    RankState,
    TrainingState,
    prune_step_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    save_export,
)
from utils.config import TrainConfig
from utils.config_loader import ConfigLoader
from utils.device import measure_matmul_flops
from utils.errors import TrainingFailure, UserError
from utils.interrupts import GracefulStop
from utils.nonfinite import NonfiniteCounter
from utils.optimizers import build_optimizer, build_scheduler, lr_at, step_unless_nonfinite
from utils.resume import resolve_parent, resolve_resume
from utils.runs import RunPaths, command_line, open_run, record_config
from utils.setup import Setup, build_setup
from utils.tracking import Tracker, check_aim_available, flat_hparams

INTERRUPTED_EXIT_CODE = 130
# evaluation batches come from their own fixed seed, so every evaluation sees the same windows
# and the training batch stream is the same whether or not (and how often) we evaluate
EVAL_SEED_OFFSET = 1_000_003


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(train, sys.argv[1:] if argv is None else argv)


def train(argv: Sequence[str]) -> int:
    """Validate everything, then open the run and fit; the exit code."""
    started = time.perf_counter()  # a time budget counts from here
    launch = distributed.current_launch()
    loader = ConfigLoader()
    args = build_parser(loader).parse_args(argv)
    check_start_flags(args)
    resume = resolve_resume(args.resume, loader, args, launch.world_size) if args.resume else None
    parent = (resolve_parent(args.init_from, args.init_from_checkpoint, loader, args)
              if args.init_from else None)
    if resume or parent:
        # the run's own vocabulary (it may hold characters this text lacks)
        start = resume or parent
        setup = build_setup(start.config, start.tokenizer)
    else:
        setup = build_setup(loader.load(args))
    if setup.config.train.aim_logging:
        check_aim_available()
    state = init_state(setup)
    if resume:
        restore_checkpoint(state, resume.checkpoint, setup.config, setup.tokenizer, launch.rank)
    if parent:
        state.model.load_state_dict(parent.saved.model.state_dict())
    # every input is valid: only now do processes join up and the run get (or touch) a folder
    with distributed.process_group(launch, setup.device) as group:
        state.step_model = group.wrap(state.step_model, setup.device)
        pace = None
        if resume is None and setup.config.train.time_budget is not None:
            setup, pace = fit_to_budget(state, setup, started)
        resumed_at_step = state.step if resume else None
        command = command_line("train.py", argv, launcher=launch.launcher())
        run, metadata = distributed.on_main(lambda: open_run(
            resume.run if resume else None, setup.config, command, resumed_at_step,
            parent.describe() if parent else None))
        console.info(f"{'resuming' if resume else 'run'} {run.run_id} at step {state.step}: "
                     + describe(state, setup))
        tracker = Tracker.open(run, setup.config, metadata, resume_step=resumed_at_step)
        if parent:
            console.info(f"fine-tuning {parent.saved.source}")
            evaluate(state, setup, tracker)  # where it starts: the parent's weights on this text
        return fit(state, setup, run, tracker, pace)


def build_parser(loader: ConfigLoader) -> argparse.ArgumentParser:
    parser = loader.build_parser(__doc__)
    parser.add_argument(
        "--resume", metavar="RUN",
        help="continue runs/<id> (or 'latest') from its last checkpoint, in the same folder; "
             "only watch-and-length settings such as --max-iters may change")
    parser.add_argument(
        "--init-from", metavar="RUN",
        help="fine-tune runs/<id> (or 'latest') in a new run: its weights, tokenizer and model "
             "shape, a fresh optimizer and schedule; e.g. with --data-path new.txt")
    parser.add_argument(
        "--init-from-checkpoint", metavar="NAME",
        help="with --init-from: start from this checkpoint (last, best or step_N) instead of "
             "the run's export")
    return parser


def check_start_flags(args: argparse.Namespace) -> None:
    if args.resume and args.init_from:
        raise UserError("--resume continues a run in its own folder and --init-from starts a "
                        "new run from one; pass one of them")
    if args.init_from_checkpoint and not args.init_from:
        raise UserError("--init-from-checkpoint names a checkpoint of the --init-from run; "
                        "pass --init-from RUN too")


def init_state(setup: Setup) -> TrainingState:
    """A fresh model, optimizer, schedule and batch stream, seeded for this process."""
    cfg = setup.config.train
    # each rank draws its own batches and dropout masks; DDP gives every rank rank 0's weights
    seed = cfg.seed + distributed.rank()
    seed_everything(seed)
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


def fit_to_budget(state: TrainingState, setup: Setup,
                  started: float) -> tuple[Setup, budget.PaceCheck | None]:
    """Time real steps and one evaluation on the fresh state, put it back exactly as it was,
    and return the setup with the max_iters that fits the rest of the time budget, and when
    the run first checks its pace (None where its schedule cannot take a new max_iters)."""
    cfg = setup.config.train
    initial_weights = {name: t.clone() for name, t in state.model.state_dict().items()}
    with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
        timings = measure_timings(state, setup)
    state.model.load_state_dict(initial_weights)
    remaining = cfg.time_budget - (time.perf_counter() - started)
    fitting = budget.steps_within(remaining, timings, cfg.eval_interval)
    max_iters = -distributed.max_over_ranks(-fitting, setup.device)  # the slowest rank's
    resolved = with_max_iters(setup, max_iters)
    for name, value in optimization(state.model, resolved).items():
        setattr(state, name, value)
    console.info(f"time budget {cfg.time_budget:g}s: {timings.step * 1e3:.1f} ms per step, "
                 f"{timings.evaluation:.1f}s per evaluation, {remaining:.0f}s left -> "
                 f"max_iters={max_iters} (--max-iters {max_iters} repeats this run)")
    pace = budget.plan_pace_check(resolved.config.train, budget.PACE_CHECK_SHARES, 0,
                                  started + cfg.time_budget, timings)
    return resolved, pace


def with_max_iters(setup: Setup, max_iters: int) -> Setup:
    cfg = setup.config.train
    return dataclasses.replace(setup, config=dataclasses.replace(
        setup.config, train=dataclasses.replace(cfg, max_iters=max_iters)))


def measure_timings(state: TrainingState, setup: Setup) -> budget.Timings:
    """Seconds per step, per evaluation and for the end of the run, on this machine."""
    cfg, device = setup.config.train, setup.device
    step = budget.time_steps(lambda: optimizer_step(state, setup), device,
                             budget.calibration_seconds(cfg.time_budget))
    if cfg.compile:  # the first evaluation compiles its own graph, once: time the second
        estimate_loss(state.step_model, setup)
    sampled = budget.time_call(lambda: estimate_loss(state.step_model, setup), device)
    # each sampled character costs about the same (the KV cache): time a few, then scale
    timed_tokens = min(cfg.sample_tokens, budget.SAMPLE_TIMING_TOKENS)
    sample = budget.time_call(lambda: sample_text(state.model, setup, timed_tokens), device)
    sample *= cfg.sample_tokens / max(1, timed_tokens)
    # a full-split pass runs batches of the same shape as the sampled estimate's
    per_batch = sampled / (2 * cfg.eval_iters)
    full = per_batch * math.ceil(full_split_windows(setup) / cfg.batch_size)
    evaluation = (sampled / 2 + full if cfg.eval_full else sampled) + sample
    # the run ends with an evaluation, whose sample the report shows: the end adds no sample
    return budget.Timings(step=step, evaluation=evaluation, end=full)


def fit(state: TrainingState, setup: Setup, run: RunPaths, tracker: Tracker,
        pace: budget.PaceCheck | None = None) -> int:
    """The training loop, then the final checkpoint, export and report; the exit code."""
    resume_command = (f"{shlex.join(distributed.current_launch().launcher())} train.py "
                      f"--resume {run.root}")
    try:
        with GracefulStop() as stop:
            clock = budget.LoopClock(state.step)
            end, setup = training_loop(state, setup, run, tracker, stop, pace, clock)
            console.info(f"training ended at step {state.step}: {end} "
                         f"({clock.training_seconds():.1f}s of steps, evaluations left out)")
            tracker.log_text("end_reason", end, state.step)
            if not stop.requested:
                state.last_losses["val_full"] = full_split_loss(state.step_model, setup)
                tracker.log({"val/loss_full": state.last_losses["val_full"]}, state.step)
            if state.last_saved_step != state.step:
                write_checkpoints(run, state, setup, [f"step_{state.step}", "last"])
            distributed.on_main(lambda: save_export(run.export, state.model, setup.tokenizer))
        tracker.log_summary(flat_hparams(setup.config), {
            "hparams/final_val_loss": state.last_losses.get("val", math.nan),
            "hparams/best_val_loss": state.best_val_loss,
            "hparams/final_val_loss_full": state.last_losses.get("val_full", math.nan),
        })
    except KeyboardInterrupt:
        console.warn("interrupted again: quitting at once; resume from the last checkpoint "
                     f"with {resume_command}")
        return INTERRUPTED_EXIT_CODE
    finally:
        tracker.close()
    distributed.on_main(lambda: report(run, state, setup))
    if stop.requested:
        console.warn(f"stopped by {stop.name} at step {state.step}; resume with "
                     f"{resume_command}")
        return stop.exit_code
    return 0


def training_loop(state: TrainingState, setup: Setup, run: RunPaths, tracker: Tracker,
                  stop: GracefulStop, pace: budget.PaceCheck | None,
                  clock: budget.LoopClock) -> tuple[str, Setup]:
    """Optimizer steps until max_iters, early stopping or a stop signal; returns why it ended,
    and the setup with the max_iters the pace checks settled on. The clock is paused during
    evaluations."""
    cfg = setup.config.train
    nonfinite = NonfiniteCounter(state.nonfinite_in_a_row, state.nonfinite_total, setup.device)
    speed = SpeedMeter(setup, state.model)
    progress = tqdm(total=cfg.max_iters, initial=state.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.5,
                    disable=not distributed.is_main_process())
    check_stop = True
    try:
        while state.step < cfg.max_iters:
            if check_stop and stop_agreed(stop, setup.device):
                check_nonfinite(nonfinite, state, cfg, tracker, run)
                return f"stopped by {stop.name}", setup
            result = optimizer_step(state, setup)
            state.scheduler.step()
            state.step += 1
            progress.update(1)
            speed.steps += 1
            nonfinite.record(result.is_finite)
            if pace is not None and state.step == pace.step:
                setup = check_pace(state, setup, run, tracker, pace, clock)
                cfg = setup.config.train
                progress.total = cfg.max_iters
                pace = pace.following(cfg, state.step)
            due = Due.at(state.step, cfg)
            if due.histograms:
                tracker.log_histograms(state.model, state.step)
            if due.sync_point:
                check_nonfinite(nonfinite, state, cfg, tracker, run)
            # ranks must stop at the same step, so they agree on it only where they wait for
            # the device anyway; a single process checks after every step
            check_stop = due.sync_point or not distributed.is_active()
            if due.log:
                log_progress(state, result, speed, tracker, progress)
            names = []
            if due.evaluation:
                with clock.pause():
                    if evaluate(state, setup, tracker):
                        names.append("best")
                speed.restart()  # the evaluation's time is not training time
            if due.checkpoint:
                names = [f"step_{state.step}", "last", *names]
            if names:
                write_checkpoints(run, state, setup, names)
            if cfg.patience is not None and state.evals_without_improvement >= cfg.patience:
                return (f"early stopping: val loss has not improved by {cfg.min_delta} for "
                        f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})"), setup
        return f"finished {cfg.max_iters} steps", setup
    finally:
        progress.close()


def check_pace(state: TrainingState, setup: Setup, run: RunPaths, tracker: Tracker,
               pace: budget.PaceCheck, clock: budget.LoopClock) -> Setup:
    """Fit max_iters anew to the pace of the steps so far: the setup with the new value, which
    the schedule, meta/full_config.json and later checkpoints take on."""
    cfg = setup.config.train
    seconds_per_step = clock.seconds_per_step(state.step)
    fitting = budget.refit_max_iters(state.step, seconds_per_step,
                                     pace.deadline - time.perf_counter(), pace, cfg)
    max_iters = -distributed.max_over_ranks(-fitting, setup.device)  # the slowest rank's
    message = (f"pace check at step {state.step}: {seconds_per_step * 1e3:.1f} ms per step -> "
               f"max_iters={max_iters} (--max-iters {max_iters} repeats this run)")
    console.info(message)
    tracker.log_text("pace_check", message, state.step)
    if max_iters == cfg.max_iters:
        return setup
    resolved = with_max_iters(setup, max_iters)
    # the rates so far are the same (warmup and the constant phase); the decay moves
    state.scheduler = build_scheduler(state.optimizer, resolved.config.train, state.step)
    distributed.on_main(lambda: record_config(run, resolved.config))
    return resolved


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
        peak = setup.config.train.peak_flops or measure_matmul_flops(setup.device, setup.dtype)
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
    model.eval()
    for batch in starts[distributed.rank()::distributed.world_size()].split(cfg.batch_size):
        windows = windows_at(data, batch, block_size + 1).to(setup.device)
        with setup.autocast():
            _, loss = model(windows[:, :-1], windows[:, 1:])
        totals[0] += loss.float() * len(batch)
        totals[1] += len(batch)
    model.train()
    totals = distributed.mean_over_ranks(totals)  # a ratio of means is the ratio of sums
    return (totals[0] / totals[1]).item()


def full_split_windows(setup: Setup) -> int:
    """How many block_size windows a full-split pass scores: all of the val split, up to
    full_split_max_tokens."""
    tokens = len(setup.splits.val) - 1
    if setup.config.train.full_split_max_tokens is not None:
        tokens = min(tokens, setup.config.train.full_split_max_tokens)
    return max(1, tokens // setup.config.model.block_size)


def write_checkpoints(run: RunPaths, state: TrainingState, setup: Setup,
                      names: list[str]) -> None:
    """Save the state under each name; every rank hands rank 0 its random state to keep."""
    cfg = setup.config.train
    if cfg.keep_checkpoints == 0:
        names = [n for n in names if not n.startswith("step_")] or ["last"]
    rank_states = distributed.gather_to_main(RankState.capture(state.batches))

    def save() -> None:
        save_checkpoint(run.checkpoints, names, state, setup.config, setup.tokenizer,
                        rank_states)
        prune_step_checkpoints(run.checkpoints, cfg.keep_checkpoints)

    distributed.on_main(save)
    if "last" in names:
        state.last_saved_step = state.step


def check_nonfinite(counter: NonfiniteCounter, state: TrainingState, cfg: TrainConfig,
                    tracker: Tracker, run: RunPaths) -> None:
    """Report the steps skipped since the last check; too many in a row end training."""
    new = counter.read()
    state.nonfinite_in_a_row, state.nonfinite_total = counter.in_a_row, counter.total
    if not new:
        return
    tracker.log({"nonfinite_steps": state.nonfinite_total}, state.step)
    console.warn(f"step {state.step}: {new} step(s) with a non-finite loss or gradient "
                 f"skipped since the last check ({state.nonfinite_in_a_row} in a row now, "
                 f"{state.nonfinite_total} in all)")
    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingFailure(
            f"training stopped: {state.nonfinite_in_a_row} non-finite steps in a row at "
            f"step {state.step}; the last good checkpoint is in {run.checkpoints}. Lower "
            "--learning-rate or --grad-clip, or check the data"
        )


def stop_agreed(stop: GracefulStop, device: torch.device) -> bool:
    """True if this or any other training process received a stop signal; all then stop as
    if they had received it."""
    signal_number = distributed.max_over_ranks(stop.signal_number or 0, device)
    if signal_number:
        stop.adopt(signal_number)
    return bool(signal_number)


def describe(state: TrainingState, setup: Setup) -> str:
    """The model, device and global batch, for the line that starts a run."""
    cfg, world_size = setup.config.train, distributed.world_size()
    return (f"{state.model.num_parameters() / 1e6:.2f}M parameters, vocab "
            f"{setup.tokenizer.vocab_size}, device {setup.device}, dtype {setup.dtype_name}, "
            f"{world_size} process(es); global batch {cfg.global_batch_size(world_size)} "
            f"sequences ({cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {world_size})"
            f" = {setup.tokens_per_step()} tokens per step")


def report(run: RunPaths, state: TrainingState, setup: Setup) -> None:
    """The script's final user-facing output: a sample, the final losses and the run folder."""
    if state.last_sample is not None and state.last_sample[0] == state.step:
        sample = state.last_sample[1]
    else:
        sample = sample_text(state.model, setup, setup.config.train.sample_tokens)
    print(f"--- sample ---\n{sample}\n--------------")
    losses = state.last_losses
    if losses:
        full = ""
        if "val_full" in losses:
            scored = full_split_windows(setup) * setup.config.model.block_size
            part = (f" (first {scored:,} of {len(setup.splits.val):,} val tokens)"
                    if scored + setup.config.model.block_size < len(setup.splits.val) else "")
            full = f", full-split val loss {losses['val_full']:.4f}{part}"
        print(f"final train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{full}")
    print(f"run folder: {run.root}")
    print(f"generate more: python inference.py --run {run.root}")


def sample_text(model: LanguageModel, setup: Setup, num_tokens: int) -> str:
    """A short sample from the model, starting from a newline when the vocabulary has one."""
    tokenizer = setup.tokenizer
    start = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
    prompt = torch.tensor([tokenizer.encode(start)], device=setup.device)
    generator = torch.Generator(device=setup.device).manual_seed(setup.config.train.seed)
    was_training = model.training
    model.eval()
    ids = model.generate(prompt, num_tokens, temperature=0.8, generator=generator)
    model.train(was_training)
    return tokenizer.decode(ids[0, 1:].tolist())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


if __name__ == "__main__":
    console.exit_process(main())
