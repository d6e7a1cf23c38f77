"""Fit a training run into a wall-clock budget (--time-budget).

A short calibration times real training steps and one evaluation on this machine; from those
the run gets the max_iters whose steps and evaluations end within the budget, so the
learning-rate schedule finishes exactly at the end. The resolved max_iters is recorded like
any other setting: --max-iters N repeats the run bit for bit.

A few seconds of steps can misjudge a whole run's pace (a shared machine speeds up and slows
down), so a wsd run looks again: at its pace checks, late in the constant phase, the steps
taken so far set max_iters anew. wsd's learning rate up to the end of the constant phase does
not depend on max_iters, so the new value repeats the run as well.

    plan = fit_to_budget(state, setup, started)    # plan.setup has the fitted max_iters
    check_pace(state, plan, clock, run, tracker)   # at plan.pace.step: plan.setup re-fitted

The plan is the one place the fitted max_iters lives: the training loop reads it there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from utils import console, distributed
from utils.checkpoint import TrainingState
from utils.config import TrainConfig
from utils.device import synchronize
from utils.optimizers import build_scheduler, wsd_decay_start
from utils.runs import RunPaths, record_config
from utils.setup import Setup
from utils.tracking import Tracker
from utils.training import (
    estimate_loss,
    full_split_windows,
    optimization,
    optimizer_step,
    sample_text,
)

CALIBRATION_SECONDS = 3.0  # of timed steps: enough to average out a few slow ones
# ...but never more than this share of the budget: a short run cannot spend that measuring
CALIBRATION_SHARE = 0.05
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 3, 50
SAMPLE_TIMING_TOKENS = 50  # a sample's time grows with its length: time this many, then scale
# what the estimate cannot see: a checkpoint write, the final export, and above all steps that
# run slower over a whole run than in its first seconds (BENCHMARKS.md)
SAFETY_MARGIN = 0.10
# a pace check has timed minutes of the run, checkpoints and histograms included, so the steps
# after it keep closer to its pace (BENCHMARKS.md): the rest of the run keeps a smaller margin
# and less of the budget is left idle
PACE_CHECK_MARGIN = 0.05
# pace checks come this far into wsd's constant phase: the first late enough to have timed a
# good stretch of the run and early enough that a slower pace can still shorten it by a
# quarter; the second, on more steps, corrects the first (it can lengthen the run at will)
PACE_CHECK_SHARES = (0.75, 0.95)


@dataclass(frozen=True)
class Timings:
    """Seconds one piece of a run takes on this machine."""

    step: float  # one optimizer step
    evaluation: float  # one evaluation: losses and the sample
    end: float  # what follows the last step and its evaluation: the full-split evaluation


@dataclass(frozen=True)
class PaceCheck:
    """When a budgeted run re-measures its pace, and what it fits the rest of the run into."""

    step: int  # after this many optimizer steps
    deadline: float  # the time.perf_counter() at which the budget runs out
    timings: Timings  # the calibration's: evaluations and the end are not re-timed
    later_shares: tuple[float, ...] = ()  # where the checks after this one come

    def following(self, cfg: TrainConfig, step: int) -> PaceCheck | None:
        """The next check, placed in the schedule this one left (cfg), after step."""
        return plan_pace_check(cfg, self.later_shares, step, self.deadline, self.timings)


class LoopClock:
    """Seconds per step of the training loop so far, evaluations left out."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.started = time.perf_counter()
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def training_seconds(self) -> float:
        """Seconds since the loop began, the paused ones (evaluations) left out."""
        return time.perf_counter() - self.started - self.paused_seconds

    def seconds_per_step(self, step: int) -> float:
        return self.training_seconds() / max(1, step - self.first_step)


@dataclass
class Plan:
    """How long the run trains: its setup, whose max_iters a time budget fits at the start and
    each pace check fits anew (here, and nowhere else), and the next pace check, if any."""

    setup: Setup
    pace: PaceCheck | None = None


def fit_to_budget(state: TrainingState, setup: Setup, started: float) -> Plan:
    """Time real steps and one evaluation on the fresh state, put it back exactly as it was,
    and plan the max_iters that fits the rest of the time budget, and when the run first
    checks its pace (never where its schedule cannot take a new max_iters)."""
    cfg = setup.config.train
    initial_weights = {name: t.clone() for name, t in state.model.state_dict().items()}
    with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
        timings = measure_timings(state, setup)
    state.model.load_state_dict(initial_weights)
    remaining = cfg.time_budget - (time.perf_counter() - started)
    fitting = steps_within(remaining, timings, cfg.eval_interval)
    max_iters = -distributed.max_over_ranks(-fitting, setup.device)  # the slowest rank's
    resolved = with_max_iters(setup, max_iters)
    for name, value in optimization(state.model, resolved).items():
        setattr(state, name, value)
    console.info(f"time budget {cfg.time_budget:g}s: {timings.step * 1e3:.1f} ms per step, "
                 f"{timings.evaluation:.1f}s per evaluation, {remaining:.0f}s left -> "
                 f"max_iters={max_iters} (--max-iters {max_iters} repeats this run)")
    pace = plan_pace_check(resolved.config.train, PACE_CHECK_SHARES, 0,
                           started + cfg.time_budget, timings)
    return Plan(resolved, pace)


def measure_timings(state: TrainingState, setup: Setup) -> Timings:
    """Seconds per step, per evaluation and for the end of the run, on this machine."""
    cfg, device = setup.config.train, setup.device
    step = time_steps(lambda: optimizer_step(state, setup), device,
                      calibration_seconds(cfg.time_budget))
    if cfg.compile:  # the first evaluation compiles its own graph, once: time the second
        estimate_loss(state.step_model, setup)
    sampled = time_call(lambda: estimate_loss(state.step_model, setup), device)
    # each sampled character costs about the same (the KV cache): time a few, then scale
    timed_tokens = min(cfg.sample_tokens, SAMPLE_TIMING_TOKENS)
    sample = time_call(lambda: sample_text(state.model, setup, timed_tokens), device)
    sample *= cfg.sample_tokens / max(1, timed_tokens)
    # a full-split pass runs batches of the same shape as the sampled estimate's
    per_batch = sampled / (2 * cfg.eval_iters)
    full = per_batch * math.ceil(full_split_windows(setup) / cfg.batch_size)
    evaluation = (sampled / 2 + full if cfg.eval_full else sampled) + sample
    # the run ends with an evaluation, whose sample the report shows: the end adds no sample
    return Timings(step=step, evaluation=evaluation, end=full)


def check_pace(state: TrainingState, plan: Plan, clock: LoopClock, run: RunPaths,
               tracker: Tracker) -> None:
    """Fit max_iters anew to the pace of the steps so far, into plan.setup, which the schedule,
    meta/full_config.json and later checkpoints take on; then plan the next check."""
    assert plan.pace is not None, "check_pace runs only where the plan has a pace check"
    cfg = plan.setup.config.train
    seconds_per_step = clock.seconds_per_step(state.step)
    fitting = refit_max_iters(state.step, seconds_per_step,
                              plan.pace.deadline - time.perf_counter(), plan.pace, cfg)
    max_iters = -distributed.max_over_ranks(-fitting, plan.setup.device)  # the slowest rank's
    message = (f"pace check at step {state.step}: {seconds_per_step * 1e3:.1f} ms per step -> "
               f"max_iters={max_iters} (--max-iters {max_iters} repeats this run)")
    console.info(message)
    tracker.log_text("pace_check", message, state.step)
    if max_iters != cfg.max_iters:
        plan.setup = with_max_iters(plan.setup, max_iters)
        config = plan.setup.config
        # the rates so far are the same (warmup and the constant phase); the decay moves
        state.scheduler = build_scheduler(state.optimizer, config.train, state.step)
        distributed.on_main(lambda: record_config(run, config))
    plan.pace = plan.pace.following(plan.setup.config.train, state.step)


def with_max_iters(setup: Setup, max_iters: int) -> Setup:
    cfg = setup.config.train
    return dataclasses.replace(setup, config=dataclasses.replace(
        setup.config, train=dataclasses.replace(cfg, max_iters=max_iters)))


def calibration_seconds(time_budget: float) -> float:
    """How long to time steps for, within a budget of time_budget seconds."""
    return min(CALIBRATION_SECONDS, CALIBRATION_SHARE * time_budget)


def time_steps(step: Callable[[], object], device: torch.device,
               seconds: float = CALIBRATION_SECONDS) -> float:
    """Seconds per call of step over about `seconds` of calls, after one untimed call that
    builds kernels and buffers.

    Every rank times the same number of steps (they run collectives together)."""
    step()
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    wanted = round(seconds / max(first, 1e-6))
    count = distributed.max_over_ranks(min(MAX_TIMED_STEPS, max(MIN_TIMED_STEPS, wanted)),
                                       device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / count


def time_call(action: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - start


def steps_within(seconds: float, timings: Timings, eval_interval: int,
                 margin: float = SAFETY_MARGIN) -> int:
    """The most steps (at least 1) whose training, evaluations (every eval_interval steps and
    at the last) and end fit in seconds, less a margin (a share of them) for misjudged pace."""
    usable = seconds * (1.0 - margin) - timings.end - timings.evaluation
    per_step = timings.step + timings.evaluation / eval_interval
    return max(1, math.floor(usable / per_step))


def plan_pace_check(cfg: TrainConfig, shares: tuple[float, ...], after: int,
                    deadline: float, timings: Timings) -> PaceCheck | None:
    """The first of the checks at these shares of wsd's constant phase that comes after step
    `after`, or None: none is left, or a new max_iters would change learning rates already
    used (cosine decays from the first step on, and lr_decay_iters fixes where it ends)."""
    if cfg.schedule != "wsd" or cfg.lr_decay_iters is not None:
        return None
    decay_start = wsd_decay_start(cfg.max_iters, cfg)
    for index, share in enumerate(shares):
        step = math.floor(share * decay_start)
        if step > max(0, after):
            return PaceCheck(step, deadline, timings, shares[index + 1:])
    return None


def refit_max_iters(steps_done: int, seconds_per_step: float, seconds_left: float,
                    check: PaceCheck, cfg: TrainConfig) -> int:
    """max_iters for the rest of the budget at the measured pace, but never so few that the
    decay would have begun by steps_done: every learning rate used so far stays the same."""
    timings = Timings(step=seconds_per_step, evaluation=check.timings.evaluation,
                      end=check.timings.end)
    fitting = steps_done + steps_within(seconds_left, timings, cfg.eval_interval,
                                        PACE_CHECK_MARGIN)
    return max(fitting, shortest_run_keeping(steps_done, cfg))


def shortest_run_keeping(steps_done: int, cfg: TrainConfig) -> int:
    """The fewest max_iters whose wsd schedule is still constant at step steps_done (the
    scheduler has already set the rate of that step)."""
    max_iters = steps_done + 1  # the decay starts later as max_iters grows: count up
    while wsd_decay_start(max_iters, cfg) <= steps_done:
        max_iters += 1
    return max_iters
