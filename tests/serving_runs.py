"""What tests/test_serve.py and tests/test_serve_live.py share: a runs folder with a trained
run and a random one, the in-process app over it, and helpers that read its answers."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import inference
import serve
import train
from model import LanguageModel, ModelConfig
from tests.conftest import randomised
from tokenizer import CharTokenizer
from utils import decoding
from utils.checkpoint import save_export
from utils.run_catalog import RunCatalog
from utils.runs import create_run
from utils.serving import Limits, ModelCache

CORPUS = "".join(f"{name}.\nTo be, or not to be, that is the question {i % 7}.\n"
                 for i, name in enumerate(("HAMLET", "OPHELIA", "HORATIO") * 60))
LIMITS = Limits(max_new_tokens=600, max_score_chars=400)


def build_runs(root: Path) -> Path:
    """A runs folder under root with a trained run (export, best, last, step_N, results.json)
    and an exported run with random weights, for comparing."""
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    runs = root / "runs"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = train.main(["--data-path", str(root / "corpus.txt"), "--runs-dir", str(runs),
                           "--run-tag", "trained", "--n-layer", "1", "--n-head", "2",
                           "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                           "--max-iters", "4", "--time-budget", "none", "--eval-interval", "2",
                           "--eval-iters", "1", "--checkpoint-interval", "2",
                           "--sample-tokens", "0", "--histogram-interval", "0",
                           "--device", "cpu"])
    assert code == 0
    (trained,) = runs.iterdir()
    tokenizer = CharTokenizer.from_text(CORPUS)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                         n_embd=16)
    other = create_run(runs, "random")
    save_export(other.export, randomised(LanguageModel(config), seed=3), tokenizer)
    os.rename(trained, runs / "20261201_000000_trained")  # the older of the two
    return runs


def decode_with_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """inference.py picks the faster of two float32 layouts by timing them, and the two can
    break a near-tie differently (these tiny models have many); serve.py decodes with
    F.linear. Timed as equals, inference.py takes F.linear too."""
    monkeypatch.setattr(decoding, "decode_step_seconds", lambda model, batch_size: 1.0)


@contextlib.contextmanager
def app_client(runs_dir: Path) -> Iterator[TestClient]:
    """serve.py's app over runs_dir, in process."""
    catalog = RunCatalog(runs_dir)
    cache = ModelCache(catalog, torch.device("cpu"), capacity=2)
    app = serve.create_app(catalog, cache, LIMITS, "20261201_000000_trained")
    with TestClient(app) as test_client:
        yield test_client


TRAINED = "20261201_000000_trained"


def generate(client: TestClient, **body) -> list[dict]:
    response = client.post("/api/generate", json={"run": TRAINED, **body})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def generated_text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "char")


def cli_text(runs_dir: Path, capsys, *argv: str) -> tuple[int, str, str]:
    code = inference.main(["--runs-dir", str(runs_dir), "--device", "cpu", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
