"""The training steps train.py skipped for a non-finite loss or gradient: counted, reported,
and fatal when too many come in a row."""

from __future__ import annotations

import torch

from utils import console
from utils.checkpoint import TrainingState
from utils.config import TrainConfig
from utils.errors import TrainingFailure
from utils.runs import RunPaths
from utils.tracking import Tracker


class NonfiniteGuard:
    """Counts skipped non-finite steps on the device and reads the counts only at log,
    evaluation and checkpoint steps, so the loop never waits for the device in between.

    Too many in a row end training at the next such step; the skipped steps left the weights
    untouched, so nothing is lost by noticing late.
    """

    def __init__(self, state: TrainingState, device: torch.device) -> None:
        self.since_check = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.full((), state.nonfinite_in_a_row, dtype=torch.long, device=device)

    def record(self, is_finite: torch.Tensor) -> None:
        nonfinite = (~is_finite).long()
        self.since_check += nonfinite
        self.in_a_row = (self.in_a_row + 1) * nonfinite

    def check(self, state: TrainingState, cfg: TrainConfig, tracker: Tracker,
              run: RunPaths) -> None:
        new = int(self.since_check)
        self.since_check.zero_()
        state.nonfinite_in_a_row = int(self.in_a_row)
        if not new:
            return
        state.nonfinite_total += new
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
