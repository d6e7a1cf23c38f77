"""Fit a training run into a wall-clock budget (--time-budget).

A short calibration times real training steps and one evaluation on this machine; from those
the run gets the max_iters whose steps and evaluations end within the budget, so the
learning-rate schedule finishes exactly at the end. The resolved max_iters is recorded like
any other setting: --max-iters N repeats the run bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils import distributed
from utils.device import synchronize

CALIBRATION_SECONDS = 3.0  # of timed steps: enough to average out a few slow ones
# ...but never more than this share of the budget: a 12-s GPU run cannot spend 3 s measuring
CALIBRATION_SHARE = 0.05
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 3, 50
SAMPLE_TIMING_TOKENS = 50  # a sample's time grows with its length: time this many, then scale
# what the estimate cannot see: a checkpoint write, the final export, and above all steps that
# run slower over a whole run than in its first seconds (5-14% on the 2-core CPU in BENCHMARKS)
SAFETY_MARGIN = 0.10


@dataclass(frozen=True)
class Timings:
    """Seconds one piece of a run takes on this machine."""

    step: float  # one optimizer step
    evaluation: float  # one evaluation: losses and the sample
    end: float  # what follows the last step and its evaluation: the full-split evaluation


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


def steps_within(seconds: float, timings: Timings, eval_interval: int) -> int:
    """The most steps (at least 1) whose training, evaluations (every eval_interval steps and
    at the last) and end fit in seconds."""
    usable = seconds * (1.0 - SAFETY_MARGIN) - timings.end - timings.evaluation
    per_step = timings.step + timings.evaluation / eval_interval
    return max(1, math.floor(usable / per_step))
