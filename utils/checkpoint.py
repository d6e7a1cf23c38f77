"""Model and training state on disk: atomic writes, checkpoints for resuming, and the export.

A checkpoint is one safetensors file in artifacts/checkpoints/ (step_<N>, last, best): every
tensor a resume needs (weights, optimizer moments, RNG and sampler states) plus the rest of the
state as JSON in the file's metadata. A run of several processes (torchrun) keeps every rank's
random state: rank 0's under the plain names, rank r's prefixed "rank<r>.". artifacts/export/
holds model.safetensors, config.json and tokenizer.json for inference. Nothing is unpickled:
tensors go through safetensors, the rest through JSON.

Files are written atomically (a temporary file renamed into place) and read through one open
file each, so a reader racing a training run that rewrites `last` or `best` gets the old file or
the new one, never a mix. Which run to resume, and what a resume may change, is utils/resume.py's.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from data import BatchSampler
from model import LanguageModel, ModelConfig
from tokenizer import CharTokenizer
from utils.config import Config
from utils.errors import TrainingFailure, UserError

WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_SUFFIX = ".safetensors"
STATE_METADATA_KEY = "chargpt_training_state"
STEP_CHECKPOINT = re.compile(r"step_(\d+)\.safetensors")
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MODEL_PREFIX = "model."  # a checkpoint's weights, beside its optimizer and RNG tensors


class CheckpointError(UserError):
    """Saved model state is missing, corrupt or does not fit the model."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside path, fsync it, then rename it over path.

    A reader (or a crash) sees either the old complete file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes the file private; give it the permissions any new file would get
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # the rename itself is durable only once the directory entry is flushed
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as contiguous CPU tensors, ready for safetensors."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_export(
    export_dir: Path, model: LanguageModel, tokenizer: CharTokenizer
) -> None:
    """Write the files inference needs; pass the plain module, not a compiled or DDP wrapper."""
    export_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(export_dir / WEIGHTS_FILE, lambda tmp: save_file(weights_of(model), tmp))
    config = json.dumps(dataclasses.asdict(model.config), indent=2) + "\n"
    atomic_write_text(export_dir / CONFIG_FILE, config)
    atomic_write_text(export_dir / TOKENIZER_FILE, tokenizer.to_json() + "\n")


def load_export(
    export_dir: Path, device: torch.device | str = "cpu"
) -> tuple[LanguageModel, CharTokenizer]:
    """The exported model (in eval mode, on device) and its tokenizer, verified file by file."""
    export_dir = Path(export_dir)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
               if not (export_dir / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{export_dir} is missing {', '.join(missing)}: the run has no complete export yet. "
            "train.py writes it when training ends or is stopped with Ctrl-C; train a run "
            "with python train.py"
        )
    config = _model_config(_read_json(export_dir / CONFIG_FILE), export_dir / CONFIG_FILE)
    tokenizer = CharTokenizer.load(export_dir / TOKENIZER_FILE)
    if config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"{export_dir}: config.json has vocab_size={config.vocab_size} but tokenizer.json "
            f"has {tokenizer.vocab_size} characters"
        )
    model = LanguageModel(config)
    load_weights(model, export_dir / WEIGHTS_FILE)
    return model.to(device).eval(), tokenizer


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read model config {path}: {error}") from None


def _model_config(values: Any, source: Path) -> ModelConfig:
    """The ModelConfig saved in source, or a CheckpointError if it does not make one."""
    try:
        return ModelConfig.from_saved(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot read the model config in {source}: {error}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load exported safetensors weights into model."""
    try:
        saved, _ = read_safetensors(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read weights {path}: {error}; the file is corrupt or "
                              "truncated") from None
    load_model_weights(model, saved, path)


def read_safetensors(
    path: Path, with_tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a safetensors file, read through one open file.

    safetensors' own readers open the path twice (the header, then a map of the tensors), so
    a file renamed over it in between is read half old, half new. Without tensors only the
    header is read. Raises SafetensorError, OSError or ValueError for an unreadable file."""
    with open(path, "rb") as handle:
        if not with_tensors:
            return {}, _read_header(handle).get("__metadata__") or {}
        raw = handle.read()
    metadata = _read_header(io.BytesIO(raw)).get("__metadata__") or {}
    return safetensors.torch.load(raw), metadata


def _read_header(handle: BinaryIO) -> dict[str, Any]:
    # the format: a little-endian u64 length, then that many bytes of JSON header
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"the header claims {length} bytes, more than safetensors allows")
    text = handle.read(length)
    if len(text) < length:
        raise ValueError(f"the header claims {length} bytes but the file ends first")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def load_model_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: Path,
                       prefix: str = "") -> None:
    """Load the tensors named prefix + <parameter name> into model, after checking that they
    are exactly the model's, shape for shape."""
    weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    check_weights(model, weights, path)
    model.load_state_dict(weights)


def check_weights(model: torch.nn.Module, saved: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise a CheckpointError naming the first tensor that does not fit the model."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model config: missing tensors {missing or 'none'}, "
            f"unexpected tensors {unexpected or 'none'}"
        )
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)} but the config gives "
                f"{tuple(expected[name].shape)}"
            )


@dataclass
class TrainingState:
    """Everything that changes as training runs; a checkpoint holds all of it."""

    model: LanguageModel  # the plain module: what is saved and exported
    step_model: torch.nn.Module  # what runs the steps: the model itself or its compiled form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: BatchSampler
    step: int = 0  # optimizer steps completed
    best_val_loss: float = math.inf
    last_losses: dict[str, float] = field(default_factory=dict)
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    last_saved_step: int | None = None  # the step the `last` checkpoint holds
    # (step, text) of the last evaluation's sample: the report reuses it rather than sampling
    # the same weights with the same seed again; not saved, an evaluation remakes it
    last_sample: tuple[int, str] | None = None
    training_seconds: float = 0.0  # of steps in this process, evaluations left out; not saved


@dataclass(frozen=True)
class RankState:
    """One process's random state: its batch stream and its torch, CUDA, Python and numpy
    generators. Under torchrun each rank has its own; rank 0 collects them for the checkpoint."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @classmethod
    def capture(cls, batches: BatchSampler) -> RankState:
        tensors = {f"sampler.{key}": value for key, value in batches.state_dict().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        for index, cuda_state in enumerate(cuda_states):
            tensors[f"rng.cuda.{index}"] = cuda_state
        numpy_state = np.random.get_state()
        meta = {"python_rng": random.getstate(),
                "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
        return cls(tensors, meta)

    def restore(self, batches: BatchSampler) -> None:
        batches.load_state_dict({key.removeprefix("sampler."): value
                                 for key, value in self.tensors.items()
                                 if key.startswith("sampler.")})
        torch.set_rng_state(self.tensors["rng.torch"])
        cuda_states = [self.tensors[k] for k in sorted(self.tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
        version, internal, gauss = self.meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = self.meta["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."


def save_checkpoint(
    checkpoint_dir: Path, names: Sequence[str], state: TrainingState, config: Config,
    tokenizer: CharTokenizer, rank_states: Sequence[RankState],
) -> None:
    """Write the state as checkpoint_dir/<names[0]>.safetensors, then give it the other names.

    Each name is replaced atomically (a hard link renamed into place), so every checkpoint on
    disk is complete. A failed write says so and leaves the previous checkpoints intact.
    """
    tensors, meta = _state_to_tensors(state, config, tokenizer, rank_states)
    metadata = {STATE_METADATA_KEY: json.dumps(meta)}
    first = checkpoint_dir / f"{names[0]}{CHECKPOINT_SUFFIX}"
    try:
        atomic_write(first, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        for name in names[1:]:
            _link_atomically(first, checkpoint_dir / f"{name}{CHECKPOINT_SUFFIX}")
    except OSError as error:
        raise TrainingFailure(
            f"cannot write checkpoint {first}: {error.strerror or error}; the previous "
            "checkpoints are intact"
        ) from None


def _link_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, target)


def prune_step_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step_<N> checkpoints; last and best are hard links,
    so they stay whole."""
    steps = sorted(step_checkpoints(checkpoint_dir), key=lambda item: item[0])
    for _, path in steps[:max(0, len(steps) - keep)]:
        path.unlink(missing_ok=True)


def remove_partial_writes(checkpoint_dir: Path) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint."""
    for tmp in Path(checkpoint_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def step_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = (STEP_CHECKPOINT.fullmatch(p.name) for p in Path(checkpoint_dir).glob("step_*"))
    return [(int(m.group(1)), checkpoint_dir / m.group(0)) for m in found if m]


def saved_checkpoints(checkpoint_dir: Path) -> list[str]:
    """The names of the checkpoints in the folder: best and last, then step_N, newest first."""
    folder = Path(checkpoint_dir)
    names = [name for name in ("best", "last")
             if (folder / f"{name}{CHECKPOINT_SUFFIX}").is_file()]
    return names + [f"step_{step}" for step, _ in sorted(step_checkpoints(folder), reverse=True)]


def find_checkpoint(checkpoint_dir: Path, which: str = "last") -> Path:
    """The path of checkpoint `which` (last, best or step_N), or a CheckpointError listing
    the ones there are."""
    path = Path(checkpoint_dir) / f"{which}{CHECKPOINT_SUFFIX}"
    if path.is_file():
        return path
    available = saved_checkpoints(checkpoint_dir)
    listed = ", ".join(available) if available else "none: no checkpoint was written yet"
    raise CheckpointError(f"no checkpoint '{which}' in {checkpoint_dir} (available: {listed})")


def read_checkpoint(
    path: Path, with_tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON state of a checkpoint file, or a CheckpointError if unreadable.
    Without tensors only the file's header is read."""
    try:
        tensors, metadata = read_safetensors(path, with_tensors)
        meta = json.loads(metadata[STATE_METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({error}); it is corrupt or truncated: resume from "
            "another checkpoint or start a new run"
        ) from None
    return tensors, meta


def restore_checkpoint(
    state: TrainingState, path: Path, config: Config, tokenizer: CharTokenizer, rank: int = 0
) -> None:
    """Load a checkpoint into a freshly built state, verifying first that it fits the config
    and the tokenizer of the text it will continue on; `rank` picks this process's random
    state."""
    tensors, meta = read_checkpoint(path)
    if meta["tokenizer"] != tokenizer.chars:
        raise CheckpointError(
            f"{config.train.data_path} no longer has the characters checkpoint {path} was "
            "trained on; resume with the original text"
        )
    saved_model = dataclasses.asdict(_model_config(meta["model_config"], path))
    current_model = dataclasses.asdict(config.model)
    differing = [k for k in current_model if saved_model.get(k) != current_model[k]]
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved_model.get(k)}, config {current_model[k]}"
                            for k in differing)
        raise CheckpointError(f"checkpoint {path} was made with a different model ({details})")
    load_model_weights(state.model, tensors, path, MODEL_PREFIX)
    state.optimizer.load_state_dict(_optimizer_state(tensors, meta))
    state.scheduler.load_state_dict(meta["scheduler"])
    state.scaler.load_state_dict(meta["scaler"])
    for name in ("step", "evals_without_improvement", "nonfinite_in_a_row", "nonfinite_total"):
        setattr(state, name, meta[name])
    state.best_val_loss = math.inf if meta["best_val_loss"] is None else meta["best_val_loss"]
    state.last_losses = meta["last_losses"]
    state.last_saved_step = state.step
    prefix = _rank_prefix(rank)
    RankState(
        {k.removeprefix(prefix): v for k, v in tensors.items()
         if k.startswith((f"{prefix}sampler.", f"{prefix}rng."))},
        {k: meta[prefix + k] for k in ("python_rng", "numpy_rng")},
    ).restore(state.batches)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON state (step, configs, ...) without loading its tensors."""
    return read_checkpoint(path, with_tensors=False)[1]


def load_checkpoint_model(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[LanguageModel, CharTokenizer]:
    """The model (eval mode, on device) and tokenizer stored in a training checkpoint."""
    tensors, meta = read_checkpoint(path)
    model = LanguageModel(_model_config(meta["model_config"], path))
    load_model_weights(model, tensors, path, MODEL_PREFIX)
    return model.to(device).eval(), CharTokenizer(meta["tokenizer"])


def _state_to_tensors(
    state: TrainingState, config: Config, tokenizer: CharTokenizer,
    rank_states: Sequence[RankState],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {MODEL_PREFIX + k: v for k, v in weights_of(state.model).items()}
    optimizer = state.optimizer.state_dict()
    for index, param_state in optimizer["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    meta = {
        "step": state.step,
        "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
        "last_losses": state.last_losses,
        "evals_without_improvement": state.evals_without_improvement,
        "nonfinite_in_a_row": state.nonfinite_in_a_row,
        "nonfinite_total": state.nonfinite_total,
        "model_config": dataclasses.asdict(config.model),
        "train_config": dataclasses.asdict(config.train),
        "tokenizer": tokenizer.chars,
        "optimizer_param_groups": optimizer["param_groups"],
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "world_size": len(rank_states),
    }
    for rank, rank_state in enumerate(rank_states):
        prefix = _rank_prefix(rank)
        tensors.update({prefix + k: v for k, v in rank_state.tensors.items()})
        meta.update({prefix + k: v for k, v in rank_state.meta.items()})
    return tensors, meta


def _optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": meta["optimizer_param_groups"]}

