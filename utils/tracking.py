"""One Tracker the training loop logs through; TensorBoard is always behind it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class Tracker:
    """Scalars and text for a run, written to its logs/tensorboard folder."""

    def __init__(self, tensorboard_dir: Path) -> None:
        self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        # TensorBoard renders text as markdown; a code block keeps line breaks and spacing
        self.writer.add_text(name, "```\n" + text + "\n```", step)

    def close(self) -> None:
        self.writer.close()
