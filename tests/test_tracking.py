"""Tracking read back with each tool's own reader: TensorBoard's EventAccumulator and aim.Repo."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from tests.conftest import BIN, break_package, find_aim_run, free_port, serve_and_get

# a capped end-of-run full-split score: what is tracked, not how much of input.txt is scored
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-iters", "4", "--sample-tokens", "40", "--device", "cpu",
        "--max-iters", "40", "--log-interval", "10", "--eval-interval", "20",
        "--histogram-interval", "20", "--full-split-max-tokens", "3200"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny run tracked by TensorBoard and Aim: (run folder, Aim repo folder)."""
    tmp = tmp_path_factory.mktemp("tracked")
    assert train.main([*TINY, "--aim", "--aim-repo", str(tmp / "aim"),
                       "--runs-dir", str(tmp / "runs"), "--run-tag", "tracked"]) == 0
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir, tmp / "aim"


@pytest.fixture(scope="module")
def aim_repo(tracked_run) -> Path:
    """tracked_run's Aim repo, which the other runs of this file log to as well (a repo
    costs a second to make); each run has a tag of its own, so its name is its own."""
    return tracked_run[1]


def steps_and_values(sequence) -> tuple[list[int], list[float]]:
    steps, (values, *_) = sequence.data.items_list()
    return steps, values


def test_tensorboard_holds_scalars_histograms_text_and_hparams(tracked_run):
    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"),
                              size_guidance={"tensors": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "grad_norm", "lr", "tokens_per_sec", "mfu"):
        assert [e.step for e in events.Scalars(tag)] == [10, 20, 30, 40], tag
    for tag in ("val/loss", "train/loss_eval", "val/perplexity"):
        assert [e.step for e in events.Scalars(tag)] == [20, 40], tag
    assert "hparams/best_val_loss" in tags["scalars"]
    histograms = set(tags["histograms"])
    assert {"params/token_embedding.weight", "grads/blocks.0.attn.qkv.weight"} <= histograms
    assert [e.step for e in events.Histograms("grads/token_embedding.weight")] == [20, 40]
    text_tags = {t.removesuffix("/text_summary") for t in tags["tensors"]}
    assert {"samples", "config", "meta/git", "meta/env", "meta/command"} <= text_tags
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_aim_run_is_named_by_run_id_with_hparams_losses_and_closed(tracked_run):
    from aim.storage.context import Context

    run_dir, aim_repo = tracked_run
    run = find_aim_run(aim_repo, run_dir.name)
    assert run["hparams"]["n_layer"] == 1 and run["hparams"]["batch_size"] == 8
    assert run["meta"]["git"] == (run_dir / "meta" / "git.txt").read_text()
    train_steps, _ = steps_and_values(run.get_metric("loss", Context({"subset": "train"})))
    val_steps, val_values = steps_and_values(run.get_metric("loss", Context({"subset": "val"})))
    assert (train_steps, val_steps) == ([10, 20, 30, 40], [20, 40])
    assert run["results"]["hparams/final_val_loss"] == pytest.approx(val_values[-1])
    for name in ("lr", "tokens_per_sec", "grad_norm"):
        assert steps_and_values(run.get_metric(name, Context({})))[0] == [10, 20, 30, 40], name
    assert run.get_text_sequence("samples", Context({})) is not None
    assert not run.active


def test_aim_run_is_closed_after_ctrl_c(tmp_path, capsys, monkeypatch, aim_repo):
    """Ctrl-C during step 25 (sent by the process to itself; Python runs the handler at once),
    after the first checkpoint: the Aim run is open and has metrics."""
    real_step = train.optimizer_step
    calls = {"n": 0}

    def step_with_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", step_with_ctrl_c)
    code = train.main([*TINY, "--max-iters", "100000", "--aim", "--aim-repo", str(aim_repo),
                       "--runs-dir", str(tmp_path / "runs"), "--run-tag", "ctrl-c",
                       "--checkpoint-interval", "20"])
    assert code == 130, capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not find_aim_run(aim_repo, run_dir.name).active


def test_broken_aim_install_is_reported_before_training(tmp_path, capsys, monkeypatch):
    break_package("aim", "libaim is missing", tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--aim", "--runs-dir", str(runs)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: Aim logging was requested but aim cannot be imported (libaim is missing); "
        "install it with pip install aim, or turn it off with --no-aim"]
    assert not runs.exists()


def test_tensorboard_ui_serves_the_runs(tracked_run):
    binary = shutil.which("tensorboard", path=str(BIN))
    if binary is None:
        pytest.skip("the tensorboard command is not installed")
    port = free_port()
    runs_dir = tracked_run[0].parent
    assert serve_and_get([binary, "--logdir", str(runs_dir), "--host", "127.0.0.1",
                          "--port", str(port)], port)[0] == 200


def test_histogram_bins_count_every_value_between_min_and_max():
    import torch

    from utils.tracking import histograms

    values = torch.tensor([0.0, 1.0, 1.0, 2.0, 4.0])
    (h,) = histograms({"x": values}, bins=4).values()
    assert (h.min, h.max, h.count, h.sum, h.sum_squares) == (0.0, 4.0, 5, 8.0, 22.0)
    assert h.bin_counts == [1.0, 2.0, 1.0, 1.0]  # bins [0,1) [1,2) [2,3) [3,4]
    assert h.bin_edges == [1.0, 2.0, 3.0, 4.0]
    (constant,) = histograms({"c": torch.full((3,), 2.0)}, bins=2).values()
    assert sum(constant.bin_counts) == 3


def test_resume_continues_the_same_aim_run_and_tensorboard_log(tmp_path, capsys, aim_repo):
    from aim.storage.context import Context

    args = [*TINY, "--checkpoint-interval", "20", "--aim", "--aim-repo", str(aim_repo),
            "--runs-dir", str(tmp_path / "runs"), "--run-tag", "resumed"]
    assert train.main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = (run_dir / "meta" / "aim_run.txt").read_text()
    assert train.main(["--resume", str(run_dir), "--max-iters", "60"]) == 0
    capsys.readouterr()
    assert (run_dir / "meta" / "aim_run.txt").read_text() == record
    run = find_aim_run(aim_repo, run_dir.name)
    steps, _ = steps_and_values(run.get_metric("loss", Context({"subset": "train"})))
    assert steps == [10, 20, 30, 40, 50, 60] and not run.active
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40, 50, 60]


# last in this file: `aim up` indexes the repo in the background, which no later run of the
# shared repo should meet
def test_aim_ui_serves_the_repo(aim_repo):
    binary = shutil.which("aim", path=str(BIN))
    if binary is None:
        pytest.skip("the aim command is not installed")
    port = free_port()
    assert serve_and_get([binary, "up", "--repo", str(aim_repo), "--host", "127.0.0.1",
                          "--port", str(port)], port)[0] == 200
