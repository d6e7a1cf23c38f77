"""Weights & Biases: an offline run read back through wandb's own record format (its protobuf
Record, in the log framing of its .wandb files), resumed into the same W&B run, and the
refusals before any run folder exists."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

import train
from tests.conftest import break_package

pytest.importorskip("wandb")

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "1", "--sample-tokens", "20", "--device", "cpu",
        "--log-interval", "2", "--eval-interval", "4", "--histogram-interval", "4",
        "--full-split-max-tokens", "640", "--time-budget", "none"]
# a .wandb file: a 7-byte header, then records in 32 KiB blocks, each piece of a record behind
# a 7-byte header (checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last)
BLOCK_SIZE, PIECE_HEADER = 32 * 1024, 7


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", PIECE_HEADER
    while position + PIECE_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < PIECE_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + PIECE_HEADER])
        if kind == 0 or position + PIECE_HEADER + length > len(data):
            break  # the end of what was written so far
        pending += data[position + PIECE_HEADER:position + PIECE_HEADER + length]
        position += PIECE_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(offline_run: Path) -> list:
    """The records of an offline run's .wandb file once it holds the run's exit record: W&B's
    service process may still be writing the file's end after run.finish() has returned."""
    deadline = time.monotonic() + 60
    while True:
        records = wandb_records(next(offline_run.glob("*.wandb")))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {offline_run} after 60 s"
        time.sleep(0.1)


def history(records: list) -> dict[int, dict[str, str]]:
    """{step: {key: value as JSON text}} of the history records."""
    steps = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {(item.key or "/".join(item.nested_key)): item.value_json
                     for item in record.history.item}
            # a step's row may come in more than one record: the later ones add keys
            steps.setdefault(int(items["_step"]), {}).update(items)
    return steps


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "logs" / "wandb").glob("offline-run-*"))


def test_an_offline_run_holds_the_losses_and_a_resume_continues_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--max-iters", "8", "--checkpoint-interval", "4", "--wandb",
                       "--wandb-mode", "offline", "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    out = capsys.readouterr().out
    (first,) = offline_runs(run_dir)
    assert f"upload it with: wandb sync {first}" in out
    records = finished_records(first)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_dir.name and run_record.project == "chargpt"
    steps = history(records)
    assert [s for s, items in steps.items() if "train/loss" in items] == [2, 4, 6, 8]
    assert [s for s, items in steps.items() if "val/loss" in items] == [4, 8]
    assert "val/bpc_full" in steps[8]
    # media (the sample as HTML, histograms) are logged as nested keys: name/_type and so on
    assert steps[8]["samples/_type"] == '"html-file"'
    assert steps[4]["params/token_embedding.weight/_type"] == '"histogram"'

    assert train.main(["--resume", str(run_dir), "--max-iters", "12", "--wandb",
                       "--wandb-mode", "offline"]) == 0
    capsys.readouterr()
    resumed = [p for p in offline_runs(run_dir) if p != first]
    assert len(resumed) == 1
    records = finished_records(resumed[0])
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_dir.name  # the same W&B run, continued
    steps = history(records)
    assert [s for s, items in steps.items() if "train/loss" in items] == [10, 12]


def test_wandb_missing_is_one_line_before_any_run_folder(tmp_path, capsys, monkeypatch):
    break_package("wandb", "no module named wandb", tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--max-iters", "2", "--wandb", "--runs-dir", str(runs)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: W&B logging was requested but wandb cannot be imported (no module named "
        "wandb); install it with pip install wandb, or drop --wandb"]
    assert not runs.exists()


def test_online_without_an_api_key_is_one_line_before_any_run_folder(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from wandb login
    monkeypatch.delenv("NETRC", raising=False)
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--max-iters", "2", "--wandb", "--wandb-mode", "online",
                       "--runs-dir", str(runs)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --wandb-mode online needs a W&B API key: run wandb login")
    assert not runs.exists()


@pytest.mark.parametrize("project,words", [
    ("a/b", "wandb_project must be a name without any of"),
    ("x:y", "wandb_project must be a name without any of"),
    ("", "expected a value, got an empty one"),
])
def test_a_project_name_wandb_refuses_is_refused_first(tmp_path, capsys, project, words):
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--max-iters", "2", "--wandb", "--wandb-project", project,
                       "--runs-dir", str(runs)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and words in line
    assert not runs.exists()
