"""Shared fixtures: tiny configs and a small corpus so every test runs in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import LanguageModel, ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(tiny_config).eval()


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """About 40 kB of play-like text with a small vocabulary."""
    lines = []
    for i in range(400):
        speaker = ("HAMLET", "OPHELIA", "HORATIO")[i % 3]
        lines.append(f"{speaker}.\nTo be, or not to be, that is the question {i % 7}.\n")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_script(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, from the project root by default."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGPT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *args], cwd=cwd or PROJECT_ROOT,
        env=full_env, capture_output=True, text=True, timeout=timeout,
    )
