"""What `train.py --resume` continues, and what `train.py --init-from` fine-tunes: which run,
from which checkpoint (or export), with which config.

A resumed run keeps its model, data and optimisation: only the settings in
utils/config.py's RESUMABLE_FIELDS (how long it runs and how it is watched) may change. It
resumes with as many processes as it was trained with, since each continues its own batch
stream.

A fine-tuning run is a new run: it starts from another run's weights (its export, or a named
checkpoint), keeps that run's tokenizer and model shape, and starts its optimizer and schedule
fresh.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tokenizer import CharTokenizer
from utils.checkpoint import CHECKPOINT_SUFFIX, checkpoint_meta, find_checkpoint
from utils.config import Config
from utils.config_loader import ConfigLoader
from utils.errors import UserError
from utils.runs import RunPaths, SavedModel, find_run, load_run_model

RESUMED_CHECKPOINT = "last"


@dataclass(frozen=True)
class Resume:
    run: RunPaths
    checkpoint: Path
    config: Config  # the run's saved config with the allowed overrides applied
    tokenizer: CharTokenizer  # the run's vocabulary: the text is read in it, not its own


def resolve_resume(which: str, loader: ConfigLoader, args: argparse.Namespace,
                   world_size: int) -> Resume:
    """The run to resume (a folder or 'latest'), checked against this launch and these flags."""
    run = find_run(which, Path(loader.load(args).train.runs_dir),
                   f"artifacts/checkpoints/{RESUMED_CHECKPOINT}{CHECKPOINT_SUFFIX}",
                   "a checkpoint to resume")
    checkpoint = find_checkpoint(run.checkpoints, RESUMED_CHECKPOINT)
    meta = checkpoint_meta(checkpoint)
    check_world_size(run, meta.get("world_size", 1), world_size)
    config = loader.load_for_resume({"model": meta["model_config"],
                                     "train": meta["train_config"]}, args)
    if meta["step"] >= config.train.max_iters:
        raise UserError(
            f"run {run.run_id} is finished ({meta['step']} of {config.train.max_iters} steps); "
            f"pass --max-iters N with N > {meta['step']} to train it further"
        )
    return Resume(run, checkpoint, config, CharTokenizer(meta["tokenizer"]))


def check_world_size(run: RunPaths, saved: int, current: int) -> None:
    if saved == current:
        return
    command = (f"python train.py --resume {run.root}" if saved == 1 else
               f"{saved} processes in all, e.g. torchrun --standalone "
               f"--nproc_per_node={saved} train.py --resume {run.root}")
    raise UserError(
        f"run {run.run_id} was trained by {saved} process(es) but this resume has {current}; "
        f"each process continues its own batch stream, so resume it with {command}"
    )


@dataclass(frozen=True)
class Parent:
    """The run a fine-tuning run starts from."""

    saved: SavedModel  # its weights (on the CPU) and tokenizer
    config: Config  # defaults and flags, with the parent's model shape

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.saved.tokenizer

    def describe(self) -> dict[str, str]:
        """What meta/parent.json records."""
        kind = "export" if self.saved.source == self.saved.run.export else "checkpoint"
        return {"run": str(self.saved.run.root), kind: str(self.saved.source)}


def resolve_parent(which: str, checkpoint: str | None, loader: ConfigLoader,
                   args: argparse.Namespace) -> Parent:
    """The run to fine-tune (a folder or 'latest'): its export, or with checkpoint
    ('last', 'best', 'step_N') that checkpoint."""
    saved = load_run_model(which, Path(loader.load(args).train.runs_dir), checkpoint)
    return Parent(saved, loader.load_for_fine_tune(saved.model.config, args))
