"""Checkpoint and export files: a reader racing a writer that replaces them sees a whole file,
the old one or the new one, and an unreadable file is one CheckpointError line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import checkpoint_writer
from tests.conftest import PROJECT_ROOT
from utils.checkpoint import CheckpointError, checkpoint_meta, load_export, read_checkpoint

REPLACEMENTS = 300


def start_writer(kind: str, path: Path) -> subprocess.Popen:
    """The writer process, once it has started replacing."""
    writer = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tests" / "checkpoint_writer.py"),
                               kind, str(path), str(REPLACEMENTS)], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "replacing\n"
    return writer


def read_while_writing(writer: subprocess.Popen, read) -> tuple[int, list[str]]:
    """Call read() in a loop until the writer exits; returns the reads and their failures."""
    reads, failures = 0, []
    while writer.poll() is None:
        try:
            read()
        except Exception as error:  # every failure counts, whatever its type
            failures.append(f"{type(error).__name__}: {error}")
        reads += 1
    assert writer.returncode == 0
    return reads, failures


def test_a_checkpoint_read_never_mixes_two_versions_of_the_file(tmp_path):
    path = tmp_path / "last.safetensors"
    checkpoint_writer.write_checkpoint(path, 0)

    def read() -> None:
        tensors, meta = read_checkpoint(path)
        assert tensors["model.weight"].numel() == meta["size"], "header and data of two files"
        assert torch.all(tensors["model.weight"] == meta["size"])
        assert checkpoint_meta(path)["size"] in checkpoint_writer.CHECKPOINT_SIZES

    reads, failures = read_while_writing(start_writer("checkpoint", path), read)
    assert failures == [], f"{len(failures)} of {reads} reads failed, e.g. {failures[0]}"
    assert reads > 50, "the reader hardly overlapped the writer"


def test_an_export_read_never_fails_while_it_is_replaced(tmp_path):
    export = tmp_path / "export"
    versions = [checkpoint_writer.export_model(v).state_dict() for v in (0, 1)]
    checkpoint_writer.main("export", export, 1)

    def read() -> None:
        model, tokenizer = load_export(export)
        weights = model.state_dict()
        assert any(all(torch.equal(weights[k], v[k]) for k in v) for v in versions)
        assert tokenizer.chars == checkpoint_writer.TOKENIZER.chars

    reads, failures = read_while_writing(start_writer("export", export), read)
    assert failures == [], f"{len(failures)} of {reads} reads failed, e.g. {failures[0]}"
    assert reads > 50, "the reader hardly overlapped the writer"


@pytest.mark.parametrize("keep", [0, 7, 100, -10], ids=["empty", "in-length", "in-header",
                                                        "in-tensors"])
def test_a_torn_checkpoint_is_one_checkpoint_error(tmp_path, keep):
    path = tmp_path / "last.safetensors"
    checkpoint_writer.write_checkpoint(path, 0)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    for with_tensors in (True, False):
        if keep < 0 and not with_tensors:
            continue  # the header alone is whole
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .* it is corrupt or "
                                                  r"truncated"):
            read_checkpoint(path, with_tensors)
