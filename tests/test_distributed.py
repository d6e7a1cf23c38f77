"""Distributed training under torchrun: 2 CPU processes with gloo, tiny models.

The launches go through `python -m torch.distributed.run`, which is what the torchrun command
runs, with the interpreter running the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import train
from tests import ddp_worker
from tests.conftest import PROJECT_ROOT
from utils import distributed
from utils.checkpoint import load_export, read_checkpoint
from utils.errors import UserError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--dropout", "0.1", "--eval-iters", "4", "--sample-tokens", "20",
        "--device", "cpu", "--log-interval", "10", "--eval-interval", "20",
        "--checkpoint-interval", "20", "--learning-rate", "3e-3", "--warmup-iters", "5"]
WHOLE_RUN = ("--max-iters", "200")


def torchrun_command(*args: str, launcher_flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *launcher_flags, *args]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHARGPT_") and k not in distributed.TORCHRUN_VARIABLES}
    env["CHARGPT_TOKEN_CACHE"] = os.environ["CHARGPT_TOKEN_CACHE"]  # the session's, see conftest
    return env


def torchrun(*args: str, launcher_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    for _ in range(2):
        result = subprocess.run(torchrun_command(*args, launcher_flags=launcher_flags),
                                cwd=PROJECT_ROOT, env=clean_env(),
                                capture_output=True, text=True, timeout=300)
        # --standalone picks a free port that another process may take before the workers
        # bind it; that race is torchrun's, so a launch that lost it is tried once more
        if "Address already in use" not in result.stderr:
            break
    return result


def train_with_torchrun(runs: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    result = torchrun("train.py", *TINY, "--data-path", str(corpus), "--runs-dir", str(runs),
                      *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_run(runs: Path) -> Path:
    folders = list(runs.iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("".join(f"ROMEO.\nBut soft, what light {i % 11} through yonder window "
                              "breaks?\n" for i in range(600)), encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory,
              corpus: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run of two processes, 200 steps: the run that learns, the one a
    stopped and resumed run must match, and the one a single process may not resume."""
    runs = tmp_path_factory.mktemp("whole")
    result = train_with_torchrun(runs, corpus, *WHOLE_RUN)
    return only_run(runs), result


def test_two_processes_make_one_run_that_learns(whole_run) -> None:
    run, result = whole_run
    # rank 0 alone speaks: the start line and the final report appear once
    assert result.stderr.count("2 process(es); global batch 16 sequences (8 x 1 accumulation x 2)"
                               " = 512 tokens per step") == 1
    assert result.stdout.count("run folder:") == 1
    # after the CHARGPT_* settings of the environment (the tests' token cache)
    assert (run / "meta" / "command.txt").read_text().startswith(
        f"CHARGPT_TOKEN_CACHE={os.environ['CHARGPT_TOKEN_CACHE']} torchrun --standalone "
        "--nproc_per_node=2 train.py")
    events = list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0])).Reload()
    hparams = HParamsPluginData.FromString(
        scalars.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = hparams.session_start_info.hparams
    assert (values["world_size"].number_value, values["global_batch_size"].number_value) == (2, 16)
    val = [e.value for e in scalars.Scalars("val/loss")]
    assert [e.step for e in scalars.Scalars("val/loss")] == list(range(20, 201, 20))
    assert val[-1] < val[0] - 0.3
    model, tokenizer = load_export(run / "artifacts" / "export")
    assert not any(name.startswith("module.") for name in model.state_dict())
    assert model.config.n_embd == 32 and tokenizer.vocab_size > 10
    # the checkpoint keeps each rank's own batch stream, and they differ
    tensors, meta = read_checkpoint(run / "artifacts" / "checkpoints" / "last.safetensors")
    assert meta["world_size"] == 2
    assert not torch.equal(tensors["sampler.generator"], tensors["rank1.sampler.generator"])


def test_stopped_and_resumed_under_torchrun_matches_an_uninterrupted_run(
        tmp_path: Path, corpus: Path, whole_run) -> None:
    runs = tmp_path / "parts"
    launcher = subprocess.Popen(
        torchrun_command("train.py", *TINY, "--data-path", str(corpus), "--runs-dir",
                         str(runs), *WHOLE_RUN),
        cwd=PROJECT_ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 120
    while not list(runs.glob("*/artifacts/checkpoints/step_20.safetensors")):
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to every process
    _, stderr = launcher.communicate(timeout=120)
    assert "training ended at step" in stderr and "stopped by SIGTERM" in stderr, stderr[-3000:]
    resumed = only_run(runs)
    stopped_at = read_checkpoint(resumed / "artifacts/checkpoints/last.safetensors")[1]["step"]
    assert 20 <= stopped_at < 200
    result = torchrun("train.py", "--resume", str(resumed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {resumed.name} at step {stopped_at}" in result.stderr
    whole = load_file(str(whole_run[0] / "artifacts/export/model.safetensors"))
    parts = load_file(str(resumed / "artifacts/export/model.safetensors"))
    for name, tensor in whole.items():  # dropout on: every rank's RNG must be restored
        assert torch.equal(tensor, parts[name]), name


def test_resume_with_another_number_of_processes_is_refused(whole_run, capsys) -> None:
    run, _ = whole_run
    before = sorted(p.name for p in run.rglob("*"))
    # in this process, a single one, as `python train.py` runs it
    assert train.main(["--resume", str(run), "--max-iters", "400"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: run {run.name} was trained by 2 process(es) but this resume has 1; each "
        "process continues its own batch stream, so resume it with 2 processes in all, e.g. "
        f"torchrun --standalone --nproc_per_node=2 train.py --resume {run}")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_a_bad_config_under_torchrun_is_reported_once(tmp_path: Path) -> None:
    result = torchrun("train.py", "--batch-size", "0", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert result.stderr.count("error: batch_size must be at least 1") == 1
    assert "Traceback (most recent call last):\n  File \"" + str(PROJECT_ROOT) not in result.stderr
    assert not (tmp_path / "runs").exists()


WORKER_MODES = ("equivalence", "accumulation", "nonfinite")
Ranks = list[tuple[dict[str, torch.Tensor], dict]]  # each rank's weights and record


@pytest.fixture(scope="module")
def worker_launch(tmp_path_factory: pytest.TempPathFactory,
                  corpus: Path) -> tuple[dict[str, Ranks], subprocess.CompletedProcess]:
    """Every training mode of tests/ddp_worker.py, one after the other in one launch, which
    then fails on rank 0 ("main_fails"): each mode's ranks, and the launch's result."""
    out = tmp_path_factory.mktemp("worker")
    result = torchrun(str(Path("tests") / "ddp_worker.py"),
                      ",".join((*WORKER_MODES, "main_fails")), str(corpus), str(out))
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted(WORKER_MODES), result.stderr[-3000:]  # every mode before the failure
    ranks = {mode: [(load_file(str(out / mode / f"rank{r}.safetensors")),
                     json.loads((out / mode / f"rank{r}.json").read_text())) for r in range(2)]
             for mode in WORKER_MODES}
    return ranks, result


@pytest.fixture(scope="module")
def worker_ranks(worker_launch) -> dict[str, Ranks]:
    return worker_launch[0]


@pytest.mark.parametrize("mode", ["equivalence", "accumulation"])
def test_two_ranks_with_half_batches_match_one_process_with_the_whole(
        mode: str, corpus: Path, worker_ranks: dict[str, Ranks]) -> None:
    model, record = ddp_worker.run(mode, corpus, distributed.Group())  # one process
    assert all(record["is_finite"])
    single = model.state_dict()
    ranks = worker_ranks[mode]
    for weights, record in ranks:
        assert all(record["is_finite"])
        # one all-reduce per optimizer step (the tiny model fits one bucket): with two
        # micro-batches, the first keeps its gradients local
        assert record["allreduces"] == ddp_worker.STEPS
        for name, tensor in single.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)
    changed = [n for n, t in ranks[0][0].items() if not torch.equal(t, ranks[1][0][n])]
    assert not changed, f"replicas diverged in {changed}"


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(
        worker_ranks: dict[str, Ranks]) -> None:
    ranks = worker_ranks["nonfinite"]
    expected = [step != ddp_worker.NONFINITE_STEP for step in range(ddp_worker.STEPS)]
    assert [record["is_finite"] for _, record in ranks] == [expected, expected]
    (rank0, _), (rank1, _) = ranks
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"replicas diverged in {name}"


def test_a_failure_on_rank_0_ends_every_rank_with_the_error_shown_once(worker_launch) -> None:
    _, result = worker_launch
    assert result.returncode != 0
    assert result.stderr.count("error: cannot write checkpoint: No space left on device") == 1
    assert "exitcode  : 1" in result.stderr  # torchrun's summary names the failed rank
    assert "[rank" not in result.stderr  # no traceback from any rank


def test_a_killed_rank_ends_the_others_with_one_line(tmp_path: Path) -> None:
    # torchrun checks its processes every 0.1 s and ends the rest once one has died; a slower
    # check lets the survivor's own reaction show, which is what this test is about
    result = torchrun(str(Path("tests") / "ddp_worker.py"), "rank1_killed", "unused",
                      str(tmp_path), launcher_flags=("--monitor-interval=3",))
    assert result.returncode != 0
    assert result.stderr.count("error: another training process quit") == 1
    assert "[rank0]: Traceback" not in result.stderr
    assert "Signal 9 (SIGKILL) received" in result.stderr  # torchrun names the root cause


def test_launch_comes_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def launch_with(**env: str) -> distributed.Launch:
        for name in distributed.TORCHRUN_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        distributed.current_launch.cache_clear()
        try:
            return distributed.current_launch()
        finally:
            distributed.current_launch.cache_clear()

    assert launch_with() == distributed.Launch()
    assert launch_with().launcher() == ["python"]
    four = launch_with(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4")
    assert (four.rank, four.local_rank, four.is_main, four.by_torchrun) == (5, 1, False, True)
    assert four.launcher() == ["torchrun", "--nnodes=2", "...", "--nproc_per_node=4"]
    with pytest.raises(UserError, match="RANK set but LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE "
                                        "missing: start distributed training with torchrun"):
        launch_with(RANK="0")
    with pytest.raises(UserError, match="torchrun variables must be integers"):
        launch_with(RANK="x", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")


def test_cpu_threads_are_shared_among_a_nodes_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    node_of_4 = distributed.Launch(rank=1, local_rank=1, world_size=4, local_world_size=4,
                                   by_torchrun=True)
    assert distributed.threads_per_process(node_of_4) == 4
    assert distributed.threads_per_process(distributed.Launch()) is None  # torch's default
    crowded = distributed.Launch(world_size=32, local_world_size=32, by_torchrun=True)
    assert distributed.threads_per_process(crowded) == 1


def test_single_process_helpers_pass_values_through() -> None:
    value = torch.tensor([1.0, float("nan")])
    assert distributed.mean_over_ranks(value) is value
    assert distributed.max_over_ranks(3, torch.device("cpu")) == 3
    assert distributed.gather_to_main("state") == ["state"]
    assert distributed.on_main(lambda: 7) == 7
    model = torch.nn.Linear(2, 2)
    assert distributed.Group().wrap(model, torch.device("cpu")) is model
    with pytest.raises(UserError, match="disk"):
        distributed.on_main(lambda: (_ for _ in ()).throw(UserError("disk")))
