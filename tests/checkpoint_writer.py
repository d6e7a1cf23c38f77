"""Replaces a checkpoint or an export again and again, as a training run does with `last`,
`best` and artifacts/export/, for tests/test_checkpoint.py's concurrent readers.

    python tests/checkpoint_writer.py checkpoint|export PATH REPLACEMENTS

Versions alternate between two contents that a reader can tell apart whole: the checkpoint's
two versions differ in tensor size (its JSON state names the size), the export's in weights.
It prints "replacing" once its imports are done, so a reader counts only the reads that overlap
the replacements, not those of the seconds it takes to start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import LanguageModel, ModelConfig  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402
from utils.checkpoint import STATE_METADATA_KEY, atomic_write, save_export  # noqa: E402

CHECKPOINT_SIZES = (5000, 5007)  # float32 elements: the two versions' files differ in size
EXPORT_CONFIG = ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=16)
TOKENIZER = CharTokenizer(list("abcde"))


def write_checkpoint(path: Path, version: int) -> None:
    size = CHECKPOINT_SIZES[version]
    tensors = {"model.weight": torch.full((size,), float(size))}
    metadata = {STATE_METADATA_KEY: json.dumps({"step": size, "size": size})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_model(version: int) -> LanguageModel:
    torch.manual_seed(version)
    return LanguageModel(EXPORT_CONFIG)


def main(kind: str, path: Path, replacements: int) -> None:
    models = [export_model(0), export_model(1)] if kind == "export" else []
    for i in range(replacements):
        if kind == "export":
            save_export(path, models[i % 2], TOKENIZER)
        else:
            write_checkpoint(path, i % 2)


if __name__ == "__main__":
    print("replacing", flush=True)
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
