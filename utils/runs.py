"""Run folders: unique ids, the standard layout, and the metadata that makes a run reproducible.

    run = create_run(Path("runs"), "baseline")   # runs/20261122_143000_baseline/
    write_metadata(run, config.to_dict(), command)
    run = find_run("latest", Path("runs"), "artifacts/export/model.safetensors", "an export")
    saved = load_run_model("latest", Path("runs"), checkpoint="best")   # its weights, to use
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from model import LanguageModel
from tokenizer import CharTokenizer
from utils.checkpoint import (
    CHECKPOINT_SUFFIX,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_text,
    find_checkpoint,
    load_checkpoint_model,
    load_export,
    remove_partial_writes,
    saved_checkpoints,
)
from utils.config import PROJECT_ROOT, Config
from utils.config_loader import ENV_PREFIX
from utils.errors import UserError


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / "artifacts" / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "artifacts" / "export"

    @property
    def tensorboard(self) -> Path:
        return self.root / "logs" / "tensorboard"

    @property
    def meta(self) -> Path:
        return self.root / "meta"


def create_run(runs_dir: Path, tag: str, now: datetime | None = None) -> RunPaths:
    """A new folder runs_dir/YYYYMMDD_HHMMSS_<tag>, suffixed _2, _3... if that second is taken."""
    stem = f"{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}_{tag}"
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        root = Path(runs_dir) / (stem if attempt == 1 else f"{stem}_{attempt}")
        try:
            # mkdir without exist_ok is atomic: two processes can never claim the same folder
            root.mkdir()
        except FileExistsError:
            continue
        run = RunPaths(root)
        for folder in (run.checkpoints, run.export, run.tensorboard, run.meta):
            folder.mkdir(parents=True)
        return run
    raise RuntimeError(f"could not find a free run folder name for {stem} in {runs_dir}")


def write_metadata(
    run: RunPaths, config: dict[str, Any], command: str, resumed_at_step: int | None = None
) -> dict[str, str]:
    """meta/: git state and diff, environment, the merged config and the command line.

    A resumed run writes them to meta/resumed_at_step_<N>/ instead, keeping the originals.
    Returns the texts by name, so trackers can keep a copy."""
    texts = {
        "git": git_state(PROJECT_ROOT),
        "env": environment_report(),
        "full_config": json.dumps(config, indent=2) + "\n",
        "command": command + "\n",
    }
    folder = run.meta
    if resumed_at_step is not None:
        folder = run.meta / f"resumed_at_step_{resumed_at_step}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        suffix = ".json" if name == "full_config" else ".txt"
        (folder / f"{name}{suffix}").write_text(text, encoding="utf-8")
    return texts


def write_results(run: RunPaths, results: Mapping[str, Any]) -> None:
    """meta/results.json, replaced atomically, so a reader (a search, a dashboard) sees the
    previous results or these, never a part."""
    atomic_write_text(run.meta / "results.json", json.dumps(results, indent=2) + "\n")


def read_results(run: RunPaths) -> dict[str, Any] | None:
    """meta/results.json, or None where the run has none (it never got that far)."""
    try:
        return json.loads((run.meta / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def record_config(run: RunPaths, config: Config) -> None:
    """Rewrite meta/full_config.json with the config the run now trains by (a budgeted run's
    pace check can change its max_iters)."""
    atomic_write_text(run.meta / "full_config.json",
                      json.dumps(config.to_dict(), indent=2) + "\n")


def command_line(
    script: str, argv: Sequence[str], environ: Mapping[str, str] | None = None,
    launcher: Sequence[str] = ("python",),
) -> str:
    """A shell line that repeats this invocation, config environment variables included;
    launcher is how the script was started (python, or torchrun and its process counts)."""
    environ = os.environ if environ is None else environ
    assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(environ.items())
                   if k.startswith(ENV_PREFIX)]
    return " ".join([*assignments, shlex.join([*launcher, script, *argv])])


def git_state(repo: Path) -> str:
    """Commit, branch, clean or dirty, and the diff of uncommitted changes, as text."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                text=True, check=True)
        return result.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except FileNotFoundError:
        return f"git is not installed; no version information for {repo}\n"
    except subprocess.CalledProcessError:
        return f"{repo} is not a git checkout (or has no commits); no version information\n"
    branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    status = git("status", "--porcelain")
    lines = [f"commit: {commit}", f"branch: {branch}",
             f"state: {'dirty' if status else 'clean'}"]
    if status:
        lines += ["", "status:", status.rstrip(), "", "diff against HEAD:", git("diff", "HEAD")]
    return "\n".join(lines) + "\n"


def environment_report() -> str:
    """Python, torch, accelerators, platform and installed package versions, as text."""
    lines = [
        f"python: {platform.python_version()} ({platform.python_implementation()})",
        f"torch: {torch.__version__}",
        f"cuda available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda version: {torch.version.cuda}")
        lines += [f"cuda device {i}: {torch.cuda.get_device_name(i)}"
                  for i in range(torch.cuda.device_count())]
    lines += [
        f"mps available: {torch.backends.mps.is_available()}",
        f"platform: {platform.platform()}",
        f"processor: {platform.processor() or platform.machine()}",
        f"cpu count: {os.cpu_count()}",
        f"torch threads: {torch.get_num_threads()}",
        "",
        "packages:",
    ]
    lines += [f"  {name}=={version}" for name, version in installed_packages()]
    return "\n".join(lines) + "\n"


@functools.cache
def installed_packages() -> tuple[tuple[str, str], ...]:
    """(name, version) of every installed distribution, sorted by name: read once per process
    (reading every package's metadata takes a noticeable part of a short run's start)."""
    packages = {(d.metadata["Name"] or "?").lower(): d.version for d in metadata.distributions()}
    return tuple(sorted(packages.items()))


def find_run(which: str, runs_dir: Path, required: str, description: str) -> RunPaths:
    """The run folder `which`, or for 'latest' the newest run in runs_dir that holds the
    relative path `required` (`description` names it in the error). What a run must hold
    beyond its folder is checked by whatever loads it, which can say what is there instead."""
    if which == "latest":
        candidates = [p for p in Path(runs_dir).glob("*") if (p / required).exists()]
        found = max(candidates, key=lambda p: p.name, default=None)  # ids sort by time
        if found is None:
            raise UserError(f"no run with {description} in {runs_dir}/; train one with python "
                            "train.py, or pass a run folder runs/<id>")
        return RunPaths(found)
    root = Path(which)
    if not root.is_dir():
        raise UserError(f"run folder {root} does not exist; pass a run folder such as "
                        f"{runs_dir}/<id>, or 'latest'")
    return RunPaths(root)


def open_run(run: RunPaths | None, config: Config, command: str,
             resumed_at_step: int | None,
             parent: dict[str, str] | None = None) -> tuple[RunPaths, dict[str, str]]:
    """A new run folder, or the resumed one swept of half-written checkpoints, with its
    metadata written (and meta/parent.json for a fine-tuning run); returns the folder and the
    metadata texts."""
    if run is None:
        run = create_run(Path(config.train.runs_dir), config.train.run_tag)
    else:
        remove_partial_writes(run.checkpoints)
    metadata = write_metadata(run, config.to_dict(), command, resumed_at_step=resumed_at_step)
    if parent is not None:
        metadata["parent"] = json.dumps(parent, indent=2) + "\n"
        (run.meta / "parent.json").write_text(metadata["parent"], encoding="utf-8")
    return run, metadata


@dataclass(frozen=True)
class SavedModel:
    """A run's trained model, as inference.py, export.py and --init-from load it."""

    run: RunPaths
    source: Path  # the run's export folder, or the checkpoint file
    model: LanguageModel  # in eval mode
    tokenizer: CharTokenizer


def load_run_model(which: str, runs_dir: Path, checkpoint: str | None = None,
                   device: torch.device | str = "cpu") -> SavedModel:
    """The model of run `which` (a folder, or 'latest': the newest run that has what is
    asked for): its export, or with `checkpoint` (last, best, step_N) that checkpoint."""
    if checkpoint:
        run = find_run(which, runs_dir, f"artifacts/checkpoints/{checkpoint}{CHECKPOINT_SUFFIX}",
                       f"a checkpoint '{checkpoint}'")
        source = find_checkpoint(run.checkpoints, checkpoint)
        model, tokenizer = load_checkpoint_model(source, device)
    else:
        run = find_run(which, runs_dir, f"artifacts/export/{WEIGHTS_FILE}", "an export")
        source = run.export
        saved = saved_checkpoints(run.checkpoints)
        if not (source / WEIGHTS_FILE).is_file() and saved:
            raise CheckpointError(
                f"run {run.root} has no export yet (train.py writes it when training ends or "
                f"is stopped with Ctrl-C); load one of its checkpoints meanwhile with "
                f"--checkpoint NAME ({', '.join(saved)})")
        model, tokenizer = load_export(source, device)
    return SavedModel(run, source, model, tokenizer)
