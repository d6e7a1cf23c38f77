"""Reliability: checkpoints, bit-exact resume, kill -9, signals, non-finite steps, early stopping
and the bad inputs around them."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import utils.checkpoint
from model import LanguageModel
from tests.conftest import PROJECT_ROOT, cpu_setup, state_for
from utils.checkpoint import find_checkpoint, load_checkpoint_model, read_checkpoint
from utils.config import TrainConfig
from utils.training import optimizer_step

# dropout on, so resuming must restore the RNG exactly to match; a given peak FLOP/s and a
# short full-split score spare every run the timing and the scoring that nothing here reads
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--dropout", "0.1", "--eval-iters", "2", "--sample-tokens", "0",
        "--device", "cpu", "--log-interval", "50", "--eval-interval", "100",
        "--checkpoint-interval", "40", "--max-iters", "300", "--peak-flops", "1e12",
        "--full-split-max-tokens", "3200"]


# a resumed run may change how often it checkpoints, which leaves its weights as they are: the
# runs that write a checkpoint every step go back to TINY's interval once the kills are over
EVERY_40_STEPS = ("--checkpoint-interval", "40", "--keep-checkpoints", "3")


def start(runs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "train.py"), *TINY,
                             "--runs-dir", str(runs), *extra], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pattern: str, root: Path, timeout_s: float = 60, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(root.glob(pattern)):
        assert time.monotonic() < deadline, f"nothing matched {pattern} in {timeout_s}s"
        time.sleep(poll_s)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "artifacts" / "export" / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def start_resume(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "train.py"), "--resume", str(run_dir)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """train.py as the command line runs it, in this process: its exit code, stdout and stderr.
    A run that resumes after a killed process needs no process of its own."""
    code = train.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def resume_to_the_end(capsys, run_dir: Path, *extra: str) -> str:
    code, _, err = run_in_process(capsys, "--resume", str(run_dir), *extra)
    assert code == 0, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run with the TINY config."""
    runs = tmp_path_factory.mktemp("reference")
    assert train.main([*TINY, "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    return final_weights(run_dir)


def test_sigterm_checkpoints_exits_143_and_resume_is_bit_exact(tmp_path, capsys, reference):
    runs = tmp_path / "runs"
    process = start(runs)
    wait_for("*/artifacts/checkpoints/step_40.safetensors", runs)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    (run_dir,) = runs.iterdir()
    assert f"resume with python train.py --resume {run_dir}" in err
    stopped_at = read_checkpoint(find_checkpoint(run_dir / "artifacts" / "checkpoints"))[1]
    assert 40 <= stopped_at["step"] < 300
    err = resume_to_the_end(capsys, run_dir)
    assert f"resuming {run_dir.name} at step {stopped_at['step']}" in err
    assert_bit_identical(final_weights(run_dir), reference)


def test_ctrl_c_during_the_last_step_ends_the_run_as_it_would_have(tmp_path, capsys,
                                                                    monkeypatch):
    """The loop has no step left to stop after: the run scores itself and exports as if no
    Ctrl-C had come, and says nothing of resuming a run that is finished."""
    real_step, calls = train.optimizer_step, []

    def step_with_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # the last one
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", step_with_ctrl_c)
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "12", "--runs-dir",
                                  str(tmp_path / "runs"))
    assert code == 0, err
    assert "SIGINT received" in err and "resume with" not in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    assert results["end_reason"] == "finished 12 steps"
    assert math.isfinite(results["full_split_val_loss"])


def test_repeated_kill_9_then_resume_is_bit_exact(tmp_path, capsys, reference):
    """Killed as soon as a new step checkpoint appears, and the process that resumed killed
    again at a later one; every resume picks up the last checkpoint."""
    runs = tmp_path / "runs"
    process = start(runs)
    wait_for("*/artifacts/checkpoints/step_40.safetensors", runs)
    (run_dir,) = runs.iterdir()
    steps_seen = []
    for target in (40, 120):
        if steps_seen:
            process = start_resume(run_dir)
        wait_for(f"artifacts/checkpoints/step_{target}.safetensors", run_dir)
        process.kill()
        process.wait(timeout=30)
        steps_seen.append(read_checkpoint(run_dir / "artifacts/checkpoints/last.safetensors")
                          [1]["step"])
    err = resume_to_the_end(capsys, run_dir)
    assert f"resuming {run_dir.name} at step {steps_seen[-1]}" in err
    assert all(s % 40 == 0 and s < 300 for s in steps_seen), steps_seen
    assert_bit_identical(final_weights(run_dir), reference)


def run_killed(point: str, step: int, *argv: str) -> None:
    """train.py with these arguments, killed by SIGKILL at `point` of step `step`'s save."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "tests" / "killed_train.py"), point, str(step),
         *argv], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_kill_9_at_each_point_of_a_checkpoint_write_leaves_a_loadable_checkpoint(
        tmp_path, capsys, reference):
    """Killed while the new file is half written, after it is complete but before `last`
    points to it, and between linking and renaming `last`: `last` always loads, holds the
    previous step, and the resumed run ends bit-identical to an uninterrupted one."""
    runs = tmp_path / "runs"
    new_run = [*TINY, "--checkpoint-interval", "1", "--keep-checkpoints", "1",
               "--runs-dir", str(runs)]
    kills = (("before-link", 30), ("mid-link", 60), ("mid-write", 90))
    for point, step in kills:
        run_dirs = list(runs.glob("*"))
        run_killed(point, step, *(["--resume", str(run_dirs[0])] if run_dirs else new_run))
        (run_dir,) = runs.iterdir()
        checkpoints = run_dir / "artifacts" / "checkpoints"
        tensors, meta = read_checkpoint(checkpoints / "last.safetensors")
        assert "model.token_embedding.weight" in tensors
        assert meta["step"] == step - 1, point  # the checkpoint before the interrupted one
    assert list(checkpoints.glob(".*.tmp")), "a kill mid-write leaves its temporary file"
    err = resume_to_the_end(capsys, run_dir, *EVERY_40_STEPS)
    assert "resuming" in err and "at step 89" in err
    assert not list(checkpoints.glob(".*.tmp"))
    assert_bit_identical(final_weights(run_dir), reference)


def test_checkpoints_stay_loadable_while_a_kill_lands_mid_write(tmp_path, capsys, reference):
    """A checkpoint every step makes writing most of the run's time; the kill comes the
    moment a temporary checkpoint file is seen, so it lands during a write, wherever the
    process is in it (the test above kills at each point on purpose)."""
    runs = tmp_path / "runs"
    process = start(runs, "--checkpoint-interval", "1", "--keep-checkpoints", "1")
    wait_for("*/artifacts/checkpoints/last.safetensors", runs)
    (run_dir,) = runs.iterdir()
    checkpoints = run_dir / "artifacts" / "checkpoints"
    wait_for(".*.tmp", checkpoints, poll_s=0.001)
    process.kill()
    process.wait(timeout=30)
    tensors, meta = read_checkpoint(checkpoints / "last.safetensors")  # never torn
    assert meta["step"] >= 1 and "model.token_embedding.weight" in tensors
    resume_to_the_end(capsys, run_dir, *EVERY_40_STEPS)
    assert not list(checkpoints.glob(".*.tmp"))
    assert_bit_identical(final_weights(run_dir), reference)


def inject_nan_losses(monkeypatch, bad_calls: set[int] | None = None, after: int | None = None):
    """Make the training loss non-finite on the given forward calls (counted from 1)."""
    real_forward = LanguageModel.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in (bad_calls or set()) or (after is not None and calls["n"] > after):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(LanguageModel, "forward", forward)


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, capsys, monkeypatch):
    inject_nan_losses(monkeypatch, bad_calls={5, 6})
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "20", "--log-interval", "5",
                                  "--runs-dir", str(tmp_path))
    assert code == 0, err
    # counted on the device, reported at the next log step
    assert ("step 5: 1 step(s) with a non-finite loss or gradient skipped since the last check "
            "(1 in a row now, 1 in all)") in err
    assert "step 10: 1 step(s) with a non-finite loss or gradient skipped since the last check " \
           "(0 in a row now, 2 in all)" in err
    (run_dir,) = tmp_path.iterdir()
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("nonfinite_steps")] == [(5, 1.0), (10, 2.0)]
    weights = final_weights(run_dir)
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused-skips-on-device", "plain-syncs"])
def test_a_non_finite_step_leaves_the_weights_untouched(tiny_config, monkeypatch, fused):
    inject_nan_losses(monkeypatch, after=0)
    torch.manual_seed(0)
    model = LanguageModel(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    x = torch.randint(tiny_config.vocab_size, (2, 8))

    class Batches:
        def next_batch(self):
            return x, x

    setup = cpu_setup(tiny_config, TrainConfig(batch_size=2))
    result = optimizer_step(state_for(model, optimizer, Batches()), setup)
    assert not result.is_finite
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(int(s["step"]) == 0 for s in optimizer.state.values())


def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
    inject_nan_losses(monkeypatch, after=45)
    code, _, err = run_in_process(capsys, *TINY, "--max-nonfinite-steps", "3",
                                  "--runs-dir", str(tmp_path))
    assert code == 1
    # steps 46-50 are skipped on the device; the streak is read at the step-50 log
    assert ("error: training stopped: 5 non-finite steps in a row at step 50; the last good "
            "checkpoint is in") in err
    (run_dir,) = tmp_path.iterdir()
    meta = read_checkpoint(run_dir / "artifacts/checkpoints/last.safetensors")[1]
    assert meta["step"] == 40
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    assert results["end_reason"].startswith("training stopped: 5 non-finite steps in a row")
    assert results["steps"] == 50 and results["full_split_val_loss"] is None


def test_early_stopping_ends_the_run_and_says_why(tmp_path, capsys):
    code, _, err = run_in_process(capsys, *TINY, "--eval-interval", "10", "--patience", "2",
                                  "--min-delta", "100", "--runs-dir", str(tmp_path))
    assert code == 0, err
    # the first evaluation (step 10) sets the best; steps 20 and 30 fail to beat it by 100
    assert ("training ended at step 30: early stopping: val loss has not improved by 100.0 for "
            "2 evaluations") in err
    (run_dir,) = tmp_path.iterdir()
    assert read_checkpoint(run_dir / "artifacts/checkpoints/last.safetensors")[1]["step"] == 30
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    assert results["end_reason"].startswith("early stopping: val loss has not improved")
    assert results["best_val_loss"] == pytest.approx(results["best_val_bpc"] * math.log(2))
    assert results["full_split_val_loss"] is not None and results["steps"] == 30


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = utils.checkpoint.save_file

    def failing_save(tensors, path, metadata=None):
        if '"step": 80' in metadata["chargpt_training_state"]:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(utils.checkpoint, "save_file", failing_save)
    code, _, err = run_in_process(capsys, *TINY, "--runs-dir", str(tmp_path))
    assert code == 1
    assert "No space left on device; the previous checkpoints are intact" in err
    (run_dir,) = tmp_path.iterdir()
    checkpoints = run_dir / "artifacts" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.safetensors")[1]["step"] == 40
    assert not list(checkpoints.glob(".*.tmp"))


def test_checkpoint_reload_gives_identical_logits(tmp_path, capsys):
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "40", "--runs-dir",
                                  str(tmp_path))
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    from_checkpoint, tokenizer = load_checkpoint_model(
        run_dir / "artifacts/checkpoints/last.safetensors")
    from_export, _ = utils.checkpoint.load_export(run_dir / "artifacts" / "export")
    idx = torch.tensor([tokenizer.encode("To be, or not")])
    assert torch.equal(from_checkpoint(idx)[0], from_export(idx)[0])


@pytest.fixture
def finished_run(tmp_path, capsys) -> Path:
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "40", "--runs-dir",
                                  str(tmp_path / "runs"))
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"run folder .*nope does not exist; pass a run folder such as "
                    r".*/<id>, or 'latest'"),
        ("no_checkpoint", r"no checkpoint 'last' in .* \(available: none: no checkpoint was "
                          r"written yet\)"),
        ("truncated", r"cannot read checkpoint .*last.safetensors .*it is corrupt or truncated"),
        ("finished", r"is finished \(40 of 40 steps\); pass --max-iters N with N > 40"),
        ("shape_change", r"cannot change n_embd when resuming \(saved 32, 64 from --n-embd\)"),
        ("batch_change", r"cannot change batch_size when resuming \(saved 8, 16 from "
                         r"--batch-size\)"),
    ],
)
def test_bad_resume_gets_one_line_and_exit_2(finished_run, tmp_path, capsys, case, message):
    checkpoints = finished_run / "artifacts" / "checkpoints"
    argv = ["--resume", str(finished_run), "--max-iters", "80"]
    if case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "no_checkpoint":
        for path in checkpoints.iterdir():
            path.unlink()
    elif case == "truncated":
        data = (checkpoints / "last.safetensors").read_bytes()
        (checkpoints / "last.safetensors").unlink()
        (checkpoints / "last.safetensors").write_bytes(data[:len(data) // 2])
    elif case == "finished":
        argv = argv[:2]
    elif case == "shape_change":
        argv += ["--n-embd", "64"]
    elif case == "batch_change":
        argv += ["--batch-size", "16"]
    before = sorted(p.name for p in finished_run.rglob("*"))
    code, _, err = run_in_process(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    if case != "missing":
        assert sorted(p.name for p in finished_run.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("optimizer", [["adamw"], ["muon"], ["muon", "--normuon-beta2", "none"]],
                         ids=["adamw", "normuon", "plain-muon"])
def test_resume_from_an_earlier_checkpoint_is_bit_exact(tmp_path, capsys, optimizer):
    """Every optimizer's state (AdamW's moments, Muon's momentum, NorMuon's per-neuron
    averages) is in the checkpoint."""
    runs = tmp_path / "runs"
    code, _, err = run_in_process(capsys, *TINY, "--optimizer", *optimizer, "--max-iters", "60",
                                  "--checkpoint-interval", "20", "--runs-dir", str(runs))
    assert code == 0, err
    (run_dir,) = runs.iterdir()
    uninterrupted = final_weights(run_dir)
    checkpoints = run_dir / "artifacts" / "checkpoints"
    os.replace(checkpoints / "step_20.safetensors", checkpoints / "last.safetensors")
    code, _, err = run_in_process(capsys, "--resume", str(run_dir))
    assert code == 0, err
    assert "resuming" in err and "at step 20" in err
    assert_bit_identical(final_weights(run_dir), uninterrupted)


def test_resume_may_extend_a_finished_run(finished_run, capsys):
    code, _, err = run_in_process(capsys, "--resume", str(finished_run), "--max-iters", "60")
    assert code == 0, err
    meta = read_checkpoint(finished_run / "artifacts/checkpoints/last.safetensors")[1]
    assert meta["step"] == 60
    assert (finished_run / "meta" / "resumed_at_step_40" / "command.txt").is_file()


def test_resume_latest_picks_the_newest_run(finished_run, capsys):
    code, _, err = run_in_process(capsys, "--resume", "latest", "--runs-dir",
                                  str(finished_run.parent), "--max-iters", "50")
    assert code == 0, err
    assert f"resuming {finished_run.name} at step 40" in err


def test_resume_on_a_text_with_other_characters_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    text = (PROJECT_ROOT / "input.txt").read_text(encoding="utf-8")[:50_000]
    corpus.write_text(text, encoding="utf-8")
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "40", "--data-path", str(corpus),
                                  "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    corpus.write_text(text.replace("e", "\u00e9"), encoding="utf-8")
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, _, err = run_in_process(capsys, "--resume", str(run_dir), "--max-iters", "80")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {corpus}: 1 character(s) outside the vocabulary: 'é' of the run it continues, "
        "which cannot encode them; use text within its vocabulary"]
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_a_run_resumes_on_text_that_lacks_some_of_its_characters(tmp_path, capsys):
    """The vocabulary is the run's, fixed when it started: a fine-tuning run on a text with
    fewer characters than its parent's resumes like any other run."""
    corpus = tmp_path / "corpus.txt"
    text = (PROJECT_ROOT / "input.txt").read_text(encoding="utf-8")[:50_000]
    corpus.write_text(text, encoding="utf-8")
    runs = tmp_path / "runs"
    code, _, err = run_in_process(capsys, *TINY, "--max-iters", "20", "--data-path", str(corpus),
                                  "--runs-dir", str(runs), "--run-tag", "parent")
    assert code == 0, err
    (parent,) = runs.iterdir()
    scene = tmp_path / "scene.txt"
    scene.write_text(text.replace("e", "E")[:20_000], encoding="utf-8")  # no 'e' at all
    code, _, err = run_in_process(capsys, *TINY, "--init-from", str(parent), "--data-path",
                                  str(scene), "--max-iters", "10", "--checkpoint-interval", "5",
                                  "--runs-dir", str(runs), "--run-tag", "child")
    assert code == 0, err
    (child,) = [run for run in runs.iterdir() if run != parent]
    code, _, err = run_in_process(capsys, "--resume", str(child), "--max-iters", "15")
    assert code == 0, err
    assert "resuming" in err
