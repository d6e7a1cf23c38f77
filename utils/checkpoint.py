"""Model state on disk: atomic writes, and the export a run leaves for inference.

artifacts/export/ holds model.safetensors (weights), config.json (ModelConfig) and
tokenizer.json. Nothing is unpickled: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import LanguageModel, ModelConfig
from tokenizer import CharTokenizer
from utils.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


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
    config = load_model_config(export_dir / CONFIG_FILE)
    tokenizer = CharTokenizer.load(export_dir / TOKENIZER_FILE)
    if config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"{export_dir}: config.json has vocab_size={config.vocab_size} but tokenizer.json "
            f"has {tokenizer.vocab_size} characters"
        )
    model = LanguageModel(config)
    load_weights(model, export_dir / WEIGHTS_FILE)
    return model.to(device).eval(), tokenizer


def load_model_config(path: Path) -> ModelConfig:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        return ModelConfig(**values)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"cannot read model config {path}: {error}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into model, naming any missing, unexpected or misshapen tensor."""
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read weights {path}: {error}; the file is corrupt or "
                              "truncated") from None
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
    model.load_state_dict(saved)
