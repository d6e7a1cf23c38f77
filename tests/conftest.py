"""Shared fixtures: tiny configs and a small corpus so every test runs in seconds on a CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from hypothesis import HealthCheck, settings
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from data import BatchSampler, split_ids
from model import CLASSIC_ARCHITECTURE, LanguageModel, ModelConfig
from tokenizer import CharTokenizer
from utils.checkpoint import TrainingState
from utils.config import Config, TrainConfig
from utils.setup import Setup

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's commands: aim, tensorboard


def share_cores_among_workers() -> None:
    """Under `pytest -n N` (make test), give this worker and every process its tests start
    (through OMP_NUM_THREADS) an equal share of the cores. Each would otherwise run one thread
    per core, and OpenMP threads that outnumber the cores spin against each other and make the
    suite several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


share_cores_among_workers()

# Generated inputs (tests/test_generated_inputs.py): the default profile runs the same few
# examples every time, so a red run is the code's doing, not the draw's; the long one draws
# thousands afresh (pytest --hypothesis-profile=long)
HYPOTHESIS_CHECKS_OFF = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                         HealthCheck.differing_executors]
settings.register_profile("quick", max_examples=30, deadline=None, derandomize=True,
                          database=None, suppress_health_check=HYPOTHESIS_CHECKS_OFF)
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=HYPOTHESIS_CHECKS_OFF)
settings.load_profile("quick")


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token stores of the whole session go to one temporary folder, not the project's
    .cache/: runs the tests start, in and out of process, find it in CHARGPT_TOKEN_CACHE."""
    folder = tmp_path_factory.mktemp("token_cache")
    os.environ["CHARGPT_TOKEN_CACHE"] = str(folder)
    return folder


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


# every architecture option away from the default, one at a time, and the GPT-2 layout
OPTION_SETS = {
    "default": {},
    "classic": CLASSIC_ARCHITECTURE,
    **{f"{name}={value}": {name: value} for name, value in CLASSIC_ARCHITECTURE.items()},
    "layernorm-with-bias": {"norm": "layernorm", "bias": True},
}


def randomised(model: LanguageModel, seed: int = 0) -> LanguageModel:
    """The model with every parameter drawn at random: zero-initialised layers would
    otherwise hide what a test looks for."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> LanguageModel:
    return randomised(LanguageModel(tiny_config)).eval()


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
    full_env["CHARGPT_TOKEN_CACHE"] = os.environ["CHARGPT_TOKEN_CACHE"]
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *args], cwd=cwd or PROJECT_ROOT,
        env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def break_package(name: str, message: str, tmp_path: Path, monkeypatch) -> None:
    """Make `import name` fail with ImportError(message) in this process, as a broken install
    on PYTHONPATH before the real one would."""
    fake = tmp_path / "site" / name
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, name, raising=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_get(command: list[str], port: int, path: str = "/", cwd: Path | None = None,
                  timeout_s: float = 60) -> tuple[int, str]:
    """Start a UI server on loopback, return the HTTP status and body of one of its pages
    (the front page by default), stop it."""
    # its own process group: `aim up` serves through a uvicorn child, which must go too
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                            timeout=2) as response:
                    return response.status, response.read().decode("utf-8", "replace")
            except OSError:
                if server.poll() is not None:
                    raise AssertionError(f"{command[0]} exited with {server.returncode}") from None
                time.sleep(0.1)
        raise AssertionError(f"{command[0]} did not answer on port {port}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def cpu_setup(model_config: ModelConfig, cfg: TrainConfig | None = None,
              ids: torch.Tensor | None = None, tokenizer: CharTokenizer | None = None) -> Setup:
    """A float32 CPU Setup for tests that drive the step or the evaluation themselves; without
    ids, the splits are a repeating ramp of the model's vocabulary."""
    vocab_size = model_config.vocab_size
    tokenizer = tokenizer or CharTokenizer([chr(ord("!") + i) for i in range(vocab_size)])
    if ids is None:
        ids = torch.arange(32 * model_config.block_size) % vocab_size
    cfg = cfg or TrainConfig()
    splits = split_ids(np.asarray(ids), cfg.train_split, model_config.block_size)
    return Setup(Config(model_config, cfg), tokenizer, splits, torch.device("cpu"), torch.float32)


def state_for(model: LanguageModel, optimizer: torch.optim.Optimizer,
              batches: BatchSampler) -> TrainingState:
    """A TrainingState around a model and optimizer a test built itself (constant lr)."""
    return TrainingState(
        model=model, step_model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), batches=batches)


def find_aim_run(repo_path: Path, name: str):
    """The Aim run with this name, read through aim.Repo.

    Aim's SDK reads runs through the repo index, which `aim up` keeps current in the
    background; `aim storage reindex` brings it up to date here without a server."""
    import aim

    subprocess.run([str(BIN / "aim"), "storage", "--repo", str(repo_path), "reindex", "--yes"],
                   check=True, capture_output=True)
    runs = [run for run in aim.Repo.from_path(str(repo_path)).iter_runs() if run.name == name]
    assert len(runs) == 1, f"expected one Aim run named {name}, found {len(runs)}"
    return runs[0]


def final_hparams(run_dir: Path) -> dict[str, object]:
    """The hyperparameters of the run's TensorBoard hparams summary (written at its end)."""
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {name: json_format.MessageToDict(value) for name, value in start.hparams.items()}


# make test hands whole files to one worker per core in collection order (--dist loadfile
# --no-loadscope-reorder): the files that take longest go first, so that no long file starts
# when the other worker is nearly done. Each file keeps the order of its own tests.
LONGEST_FIRST = ("test_search.py", "test_resume.py", "test_distributed.py", "test_decoding.py",
                 "test_aim_server.py", "test_serve_live.py", "test_train.py",
                 "test_generated_inputs.py", "test_inference.py", "test_tracking.py",
                 "test_data.py", "test_budget.py", "test_serve.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # a stable sort


# serve.py's tests (tests/test_serve.py, tests/test_serve_live.py): one runs folder per file,
# built by tests/serving_runs.py, which imports the server only for them

@pytest.fixture(scope="module")
def served_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.serving_runs import build_runs

    return build_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def api_client(served_runs: Path):
    """serve.py's app over served_runs, in process (FastAPI's TestClient)."""
    from tests.serving_runs import app_client

    with app_client(served_runs) as test_client:
        yield test_client


@pytest.fixture
def inference_decodes_with_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.serving_runs import decode_with_f_linear

    decode_with_f_linear(monkeypatch)
