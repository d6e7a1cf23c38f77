"""Fit a training run into a wall-clock budget (--time-budget).

A short calibration times real training steps and one evaluation on this machine; from those
the run gets the max_iters whose steps and evaluations end within the budget, so the
learning-rate schedule finishes exactly at the end. The resolved max_iters is recorded like
any other setting: --max-iters N repeats the run bit for bit.

A few seconds of steps can misjudge a whole run's pace (a shared machine speeds up and slows
down by tens of percent), so a wsd run looks again: at its pace checks, late in the constant
phase, the steps taken so far set max_iters anew. wsd's learning rate up to the end of the
constant phase does not depend on max_iters, so the new value repeats the run as well.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from utils import distributed
from utils.config import TrainConfig
from utils.device import synchronize
from utils.optimizers import wsd_decay_start

CALIBRATION_SECONDS = 3.0  # of timed steps: enough to average out a few slow ones
# ...but never more than this share of the budget: a 12-s GPU run cannot spend 3 s measuring
CALIBRATION_SHARE = 0.05
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 3, 50
SAMPLE_TIMING_TOKENS = 50  # a sample's time grows with its length: time this many, then scale
# what the estimate cannot see: a checkpoint write, the final export, and above all steps that
# run slower over a whole run than in its first seconds (5-14% on the 2-core CPU in BENCHMARKS)
SAFETY_MARGIN = 0.10
# a pace check has timed minutes of the run, checkpoints and histograms included: the steps
# after it ran from 3% faster to 4% slower than its pace on the 2-core CPU (BENCHMARKS.md), so
# the rest of the run keeps a smaller margin and less of the budget is left idle
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
