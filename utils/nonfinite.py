"""Counting the training steps skipped for a non-finite loss or gradient, on the device."""

from __future__ import annotations

import torch


class NonfiniteCounter:
    """Counts skipped steps where they are decided, on the device, so the loop never waits
    for it; `read` syncs and is called only where the loop waits anyway (log, evaluation and
    checkpoint steps). The skipped steps left the weights untouched, so nothing is lost by
    noticing late."""

    def __init__(self, in_a_row: int, total: int, device: torch.device) -> None:
        self.total = total
        self.in_a_row = in_a_row
        self._since_read = torch.zeros((), dtype=torch.long, device=device)
        self._in_a_row = torch.full((), in_a_row, dtype=torch.long, device=device)

    def record(self, is_finite: torch.Tensor) -> None:
        nonfinite = (~is_finite).long()
        self._since_read += nonfinite
        self._in_a_row = (self._in_a_row + 1) * nonfinite

    def read(self) -> int:
        """Skipped steps since the last read; `in_a_row` and `total` are then current."""
        new = int(self._since_read)
        self._since_read.zero_()
        self.in_a_row = int(self._in_a_row)
        self.total += new
        return new
