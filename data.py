"""The training corpus: read and validate a text file, split it, and draw random batches.

    splits = split_ids(torch.tensor(tokenizer.encode(text)), train_fraction=0.9, block_size=256)
    x, y = BatchSampler(splits.train, block_size=256, batch_size=64, seed=1).next_batch()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError


class DataError(UserError):
    """The corpus file cannot be used for training."""


def read_text(path: Path) -> str:
    """The whole file as UTF-8 text, or a DataError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass --data-path PATH to a text file")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; pass --data-path PATH to a text file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None
    if not raw:
        raise DataError(f"data file {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {path} is not UTF-8 text (byte {error.start}: "
            f"{raw[error.start:error.start + 1]!r}); convert it, e.g. iconv -t UTF-8"
        ) from None


@dataclass(frozen=True)
class Splits:
    train: torch.Tensor  # (N_train,) token ids
    val: torch.Tensor  # (N_val,) token ids


def split_ids(ids: torch.Tensor, train_fraction: float, block_size: int) -> Splits:
    """First train_fraction of the ids for training, the rest for validation."""
    cut = int(len(ids) * train_fraction)
    splits = Splits(train=ids[:cut], val=ids[cut:])
    needed = block_size + 1
    for name, part in (("train", splits.train), ("val", splits.val)):
        if len(part) < needed:
            raise DataError(
                f"the {name} split has {len(part)} tokens but block_size={block_size} needs at "
                f"least {needed} ({len(ids)} in all, train_split={train_fraction}); use a longer "
                f"text or a smaller --block-size"
            )
    return splits


class BatchSampler:
    """Random (x, y) windows from one split; its own generator makes batches reproducible."""

    def __init__(
        self,
        data: torch.Tensor,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch_size, block_size) int64 on the device."""
        high = len(self.data) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)
        windows = self.data[starts[:, None] + self._offsets]  # (B, block_size + 1)
        if self.device.type == "cuda":
            # pinned host memory lets the copy overlap the previous step's GPU work
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
