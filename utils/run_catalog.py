"""The runs under a runs folder as serve.py offers them: each named by its folder name alone,
what it can load (its export and checkpoints), and the row the page's run picker shows.

A name with a path in it is refused, and so is a run whose folder, export files or checkpoint
a symlink leads out of the runs folder. Every refusal is a UserError whose words the server
sends back as they are.

    catalog = RunCatalog(Path("runs"))
    run = catalog.resolve("latest", "best")    # a RunPaths, or a UserError saying why not
    rows = catalog.summaries()                 # newest first
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from model import LanguageModel, ModelConfig
from utils.checkpoint import (
    CHECKPOINT_SUFFIX,
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    saved_checkpoints,
)
from utils.errors import UserError
from utils.runs import RunPaths, read_results

EXPORT = "export"  # the checkpoint name that stands for the run's final export
LATEST = "latest"  # the run name that stands for the newest run with an export
# names a file system takes: longer ones are refused by the pattern, not by an OSError
CHECKPOINT_NAME = re.compile(r"(best|last|step_\d{1,18})")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class RunSummary:
    """One row of the run picker."""

    id: str
    tag: str
    date: str | None
    parameters: int | None
    full_split_val_loss: float | None
    full_split_val_bpc: float | None
    steps: int | None
    checkpoints: list[str]


class RunCatalog:
    """The runs directly under one runs folder, named by their folder name alone. A name with
    a path in it is refused, and so is anything a symlink leads out of the runs folder (or
    round in a loop): a run folder, or the export's files or a checkpoint inside one."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)

    def summaries(self) -> list[RunSummary]:
        """Every run with an export or a checkpoint, newest first."""
        return [summarize(run, checkpoints) for run, checkpoints in self._servable()]

    def _servable(self) -> Iterator[tuple[RunPaths, list[str]]]:
        """Each run inside the runs folder, newest first, with what it can serve from inside."""
        for folder in sorted(self.runs_dir.iterdir(), reverse=True) if self.has_runs() else []:
            if folder.is_dir() and RUN_ID.fullmatch(folder.name) and self._inside(folder):
                run = RunPaths(folder)
                checkpoints = [name for name in checkpoint_names(run)
                               if self._all_inside(served_files(run, name))]
                if checkpoints:
                    yield run, checkpoints

    def has_runs(self) -> bool:
        return self.runs_dir.is_dir()

    def resolve(self, run_id: str, checkpoint: str = EXPORT) -> RunPaths:
        """The run folder run_id names ('latest': the newest run that has the checkpoint, as
        inference.py takes it), or a UserError saying why it cannot be served."""
        if checkpoint != EXPORT and not CHECKPOINT_NAME.fullmatch(checkpoint):
            raise UserError(f"checkpoint {checkpoint[:100]!r} is not one a run has: name "
                            "export, best, last or step_N")
        if run_id == LATEST:
            newest = next((run.run_id for run, names in self._servable() if checkpoint in names),
                          None)
            if newest is None:
                what = "an export" if checkpoint == EXPORT else f"a checkpoint '{checkpoint}'"
                raise UserError(f"no run with {what} in {self.runs_dir}/; train one with "
                                "python train.py")
            run_id = newest
        if not RUN_ID.fullmatch(run_id):
            raise UserError(f"run {run_id[:100]!r} is not a run id: name a folder of "
                            f"{self.runs_dir}/ by its name alone, such as "
                            "20261207_143708_baseline")
        folder = self.runs_dir / run_id
        if not folder.is_dir():
            raise UserError(f"no run {run_id!r} in {self.runs_dir}/; GET /api/runs lists them")
        run = RunPaths(folder)
        if not self._all_inside([folder, *served_files(run, checkpoint)]):
            raise UserError(f"run {run_id!r} leads out of {self.runs_dir}/ (or its symlinks "
                            "go round in a loop); only runs inside it are served")
        return run

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.runs_dir.resolve())
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            return False

    def _all_inside(self, paths: list[Path]) -> bool:
        return all(self._inside(path) for path in paths)


def weights_path(run: RunPaths, checkpoint: str) -> Path:
    """The file holding the weights a checkpoint name stands for."""
    if checkpoint == EXPORT:
        return run.export / WEIGHTS_FILE
    return run.checkpoints / f"{checkpoint}{CHECKPOINT_SUFFIX}"


def served_files(run: RunPaths, checkpoint: str) -> list[Path]:
    """Every file loading a checkpoint name reads: the export's three, or one checkpoint."""
    if checkpoint == EXPORT:
        return [run.export / name for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)]
    return [weights_path(run, checkpoint)]


def checkpoint_names(run: RunPaths) -> list[str]:
    """What can be loaded from the run: its export first, then best, last and step_N."""
    names = [EXPORT] if weights_path(run, EXPORT).is_file() else []
    return names + [name for name in saved_checkpoints(run.checkpoints)
                    if CHECKPOINT_NAME.fullmatch(name)]


def summarize(run: RunPaths, checkpoints: list[str]) -> RunSummary:
    """The run picker's row: what the run's meta folder says, where it says it."""
    config = read_json(run.meta / "full_config.json")
    results = read_results(run)
    results = results if isinstance(results, dict) else {}
    train, model = (section(config, name) for name in ("train", "model"))
    return RunSummary(
        id=run.run_id, tag=str(train.get("run_tag", "")), date=run_date(run.run_id),
        parameters=parameter_count(model),
        full_split_val_loss=number(results.get("full_split_val_loss")),
        full_split_val_bpc=number(results.get("full_split_val_bpc")),
        steps=number(results.get("steps")), checkpoints=checkpoints)


def section(config: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """A section of a saved config, or nothing where the file is not what train.py writes."""
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def number(value: Any) -> Any:
    """A results.json figure, or None where it is not a number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_date(run_id: str) -> str | None:
    """The start time a run id begins with (YYYYMMDD_HHMMSS), as ISO 8601."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d_%H%M%S").isoformat()
    except ValueError:
        return None


def parameter_count(model_config: dict[str, Any] | None) -> int | None:
    """The parameters of the model a saved config describes, counted without building it."""
    if not model_config:
        return None
    try:
        fields = {k: v for k, v in model_config.items()
                  if k in ModelConfig.__dataclass_fields__}
        with torch.device("meta"):
            return LanguageModel(ModelConfig(**fields)).num_parameters()
    except (TypeError, ValueError, ArithmeticError):
        return None
