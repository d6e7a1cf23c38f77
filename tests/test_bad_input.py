"""Every bad input to train.py: one line on stderr, exit code 2, and no run folder written.

The same cases, with their fixes, are the README's troubleshooting table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import train

SHORT = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8",
         "--max-iters", "1", "--device", "cpu"]


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# (case id, setup(tmp) -> extra argv, message pattern)
CASES = [
    ("wrong-type", lambda t: ["--batch-size", "lots"],
     r"batch_size: expected an integer, got 'lots' \(from --batch-size\)"),
    ("out-of-range", lambda t: ["--learning-rate", "-1"],
     r"learning_rate must be > 0 \(learning_rate=-1.0 from --learning-rate\)"),
    ("heads-do-not-divide", lambda t: ["--n-embd", "10", "--n-head", "3"],
     r"n_embd=10 must be divisible by n_head=3"),
    ("unknown-flag", lambda t: ["--lerning-rate", "1"],
     r"unknown flag --lerning-rate; did you mean --learning-rate\?"),
    ("unknown-key-in-file", lambda t: ["--config", str(write(t / "c.yaml", b"n_layers: 2\n"))],
     r"unknown config key 'n_layers' in --config .*c.yaml; did you mean 'n_layer'\?"),
    ("unparseable-file", lambda t: ["--config", str(write(t / "c.json", b"{oops"))],
     r"cannot parse config file .*c.json"),
    ("missing-config-file", lambda t: ["--config", str(t / "none.yaml")],
     r"config file .*none.yaml does not exist"),
    ("bad-dtype", lambda t: ["--dtype", "fp8"], r"dtype: expected one of auto, float32"),
    ("data-missing", lambda t: ["--data-path", str(t / "none.txt")],
     r"data file .*none.txt does not exist"),
    ("data-empty", lambda t: ["--data-path", str(write(t / "e.txt", b""))],
     r"--data-path .*e.txt holds no text"),
    ("data-folder-without-text", lambda t: ["--data-path", str(t)],
     r"folder .* holds no .txt \(or .txt.gz\) files"),
    ("data-not-utf8", lambda t: ["--data-path", str(write(t / "l.txt", b"\xff\xfe" * 50))],
     r"is not UTF-8 text"),
    ("data-too-short", lambda t: ["--data-path", str(write(t / "s.txt", b"abcdefghijkl"))],
     r"the val split has 2 tokens but block_size=8 needs at least 9"),
    ("resume-missing-folder", lambda t: ["--resume", str(t / "runs" / "nope")],
     r"run folder .*nope does not exist; pass a run folder such as .*/<id>, or 'latest'"),
    ("resume-no-checkpoint", lambda t: ["--resume", str(t)],
     r"no checkpoint 'last' in .*checkpoints \(available: none"),
    ("resume-corrupt-checkpoint",
     lambda t: (t / "artifacts" / "checkpoints").mkdir(parents=True)
     or write(t / "artifacts" / "checkpoints" / "last.safetensors", b"\x00" * 64)
     and ["--resume", str(t)],
     r"cannot read checkpoint .*last.safetensors .*corrupt or truncated"),
]
if not torch.cuda.is_available():
    CASES.append(("device-unavailable", lambda t: ["--device", "cuda"],
                  r"device=cuda but CUDA is not available here; use --device cpu or auto"))


@pytest.mark.parametrize(("setup", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, setup, message):
    runs = tmp_path / "runs"
    argv = [*SHORT, "--runs-dir", str(runs), *setup(tmp_path)]
    before = sorted(tmp_path.rglob("*"))
    code = train.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(tmp_path.rglob("*")) == before
