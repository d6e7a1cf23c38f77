"""search.py: trials as train.py runs, the study continued, Ctrl-C and a killed search, the cap
over several processes, and every bad space file or flag refused before anything is made."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import search
from tests.conftest import PROJECT_ROOT, run_script
from utils.config_loader import ConfigLoader
from utils.search_space import SearchSpace, trial_flags
from utils.study import (
    ended_as,
)
from utils.trial_process import ProcessOutcome

# train.py's smallest runs; a trial takes about 3 s, most of it starting Python and torch
TINY_TRIAL = ["--n-layer", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
              "--eval-iters", "1", "--full-split-max-tokens", "64", "--sample-tokens", "5",
              "--histogram-interval", "0", "--device", "cpu", "--num-threads", "1",
              "--data-path", "corpus.txt"]
SPACE = "learning_rate: {low: 0.001, high: 0.01, log: true}\nn_head: {choices: [4, 3]}\n"
STORAGE = "sqlite:///runs/search/studies.db"


@pytest.fixture
def workdir(tmp_path: Path, corpus_file: Path) -> Path:
    (tmp_path / "space.yaml").write_text(SPACE, encoding="utf-8")
    return tmp_path


def search_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("search.py", "--space", "space.yaml", *args, cwd=workdir)


def search_here(workdir: Path, capsys, *args: str) -> subprocess.CompletedProcess:
    """search.py's main in this process (its trials are train.py processes all the same):
    what search_cli gives, without starting Python and torch once more."""
    capsys.readouterr()
    with contextlib.chdir(workdir):
        code = search.main(["--space", "space.yaml", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["search.py", *args], code, captured.out, captured.err)


def trial_lines(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^trial (\d+): (.*)$", stdout,
                                                             re.MULTILINE)}


def load(workdir: Path, study: str, storage: str = STORAGE) -> optuna.Study:
    with contextlib.chdir(workdir):
        return optuna.load_study(study_name=study, storage=storage)


def start_search(workdir: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGPT_")}
    env["CHARGPT_TOKEN_CACHE"] = os.environ["CHARGPT_TOKEN_CACHE"]
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "search.py"), "--space",
                             "space.yaml", *args], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, what: str, process: subprocess.Popen | None = None,
             timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, f"the search ended first: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def dashboard_get(workdir: Path, storage: str, path: str) -> tuple[str, str]:
    """One page of the app that `optuna-dashboard STORAGE` serves, asked in process, from the
    folder the search ran in (the storage URL is relative to it)."""
    import optuna_dashboard

    answer = {}
    with contextlib.chdir(workdir):
        app = optuna_dashboard.wsgi(storage)
        body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "test",
                             "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                             "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr},
                            lambda status, headers, *_: answer.update(status=status)))
    return answer["status"], body.decode("utf-8", "replace")


def test_a_search_runs_trials_reports_the_best_and_continues(workdir, capsys):
    fixed = [*TINY_TRIAL, "--max-iters", "10", "--eval-interval", "10"]
    # sampler seed 2 picks n_head=3 for trial 1: 16 is not divisible by 3
    first = search_cli(workdir, "--study", "s", "--trials", "3", "--sampler-seed", "2", *fixed)
    assert first.returncode == 0, first.stderr
    lines = trial_lines(first.stdout)
    assert sorted(lines) == [0, 1, 2]
    assert lines[0].startswith("learning_rate=0.003 n_head=4: full-split val loss")  # as given
    assert "failed: n_embd=16 must be divisible by n_head=3" in lines[1]
    assert "Traceback" not in first.stderr
    study = load(workdir, "s")
    for trial in study.trials:
        if trial.params["n_head"] == 3:
            assert ended_as(trial) == "failed" and "divisible" in trial.user_attrs["error"]
            continue
        run = Path(workdir / trial.user_attrs["run"])
        assert run.name.endswith(f"_s-t{trial.number}")
        results = json.loads((run / "meta" / "results.json").read_text())
        assert trial.value == results["full_split_val_loss"]
        assert f"full-split val loss {trial.value:.4f}" in lines[trial.number]
        assert str(run.relative_to(workdir)) in lines[trial.number]
    assert study.trials[0].user_attrs["baseline"] is True
    best = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    repeat = re.search(r"^repeat it: (python train\.py .*)$", first.stdout, re.MULTILINE)
    assert repeat and f"--learning-rate {best.params['learning_rate']!r}" in repeat.group(1)
    assert f"optuna-dashboard {STORAGE}" in first.stdout
    status, studies = dashboard_get(workdir, STORAGE, "/api/studies")
    assert status.startswith("200") and '"study_name": "s"' in studies

    more = search_here(workdir, capsys, "--study", "s", "--trials", "4", *fixed)
    assert more.returncode == 0, more.stderr
    assert sorted(trial_lines(more.stdout)) == [3]
    assert len(load(workdir, "s").trials) == 4

    changed = search_here(workdir, capsys, "--study", "s", "--trials", "5", *fixed, "--dropout",
                          "0.1")
    assert changed.returncode == 2
    assert changed.stderr.startswith("error: study s was started with other fixed flags")
    assert len(load(workdir, "s").trials) == 4


def start_long_trial(workdir: Path, study: str) -> tuple[list[str], subprocess.Popen]:
    """A one-trial search whose trial runs for seconds; returns its flags and process once the
    trial has written its first checkpoint."""
    fixed = ["--study", study, "--trials", "1", *TINY_TRIAL, "--max-iters", "600",
             "--eval-interval", "600", "--checkpoint-interval", "20"]
    search_process = start_search(workdir, *fixed)
    wait_for(lambda: list(workdir.glob(f"runs/*_{study}-t0/artifacts/checkpoints/last.*")),
             "the trial's first checkpoint", search_process)
    return fixed, search_process


def test_ctrl_c_or_a_killed_search_stops_the_trial_and_the_same_command_resumes_it(workdir):
    """Ctrl-C stops the trial the way it stops train.py and says how to continue; the same
    command runs it again, resuming its run folder. That search is then killed: its trial gets
    SIGTERM, checkpoints and stops, and the next search resumes it to the end."""
    fixed, search_process = start_long_trial(workdir, "c")
    search_process.send_signal(signal.SIGINT)
    out, err = search_process.communicate(timeout=120)
    assert search_process.returncode == 130, err
    assert re.search(r"^trial 0: .*: interrupted, \d+ s, runs/\S+_c-t0$", out, re.MULTILINE)
    # the command that continues repeats this one, CHARGPT_ variables included
    assert re.search(r"search stopped by SIGINT; continue it with (CHARGPT_\S+ )*python "
                     r"search\.py --space space\.yaml --study c ", err)
    (run,) = workdir.glob("runs/*_c-t0")
    stopped = json.loads((run / "meta" / "results.json").read_text())
    assert stopped["end_reason"] == "stopped by SIGINT" and stopped["steps"] < 600
    (trial,) = load(workdir, "c").trials
    assert ended_as(trial) == "interrupted" and trial.user_attrs["run"] == str(run.relative_to(
        workdir))

    (run / "meta" / "results.json").unlink()  # the resumed run writes its own
    search_process = start_search(workdir, *fixed)
    # a checkpoint after the resumed step: the trial is in its loop, where SIGTERM checkpoints
    wait_for(lambda: any(int(p.stem.removeprefix("step_")) > stopped["steps"]
                         for p in run.glob("artifacts/checkpoints/step_*.safetensors")),
             "the resumed trial's first checkpoint", search_process)
    search_process.kill()
    _, err = search_process.communicate(timeout=60)
    assert "trial 0 did not finish: it runs again first" in err
    assert f"trial 1 running: learning_rate=0.003 n_head=4, resuming runs/{run.name}" in err
    wait_for(lambda: (run / "meta" / "results.json").is_file(), "the trial to stop")
    killed = json.loads((run / "meta" / "results.json").read_text())
    assert killed["end_reason"] == "stopped by SIGTERM" and killed["steps"] < 600

    again = search_cli(workdir, *fixed)
    assert again.returncode == 0, again.stderr
    assert "trial 1 was left running by a search that is gone: it runs again" in again.stderr
    assert f"resuming runs/{run.name}" in again.stderr
    finished = json.loads((run / "meta" / "results.json").read_text())
    assert finished["steps"] == 600 and finished["end_reason"] == "finished 600 steps"
    trials = load(workdir, "c").trials
    assert [ended_as(t) for t in trials] == ["interrupted", "lost", "complete"]
    assert trials[2].value == finished["full_split_val_loss"]


def test_trials_caps_the_study_over_every_process_that_shares_it(workdir, capsys):
    journal = str(workdir / "study.journal")
    fixed = ["--study", "shared", "--trials", "3", "--storage", journal, *TINY_TRIAL,
             "--max-iters", "10", "--eval-interval", "10"]
    other = start_search(workdir, *fixed)
    here = search_here(workdir, capsys, *fixed)  # the second worker: this process
    results = [other.communicate(timeout=300), (here.stdout, here.stderr)]
    assert [other.returncode, here.returncode] == [0, 0], results
    ran = [n for out, _ in results for n in trial_lines(out)]
    assert sorted(ran) == sorted(set(ran)) and len(ran) >= 3
    study = optuna.load_study(
        study_name="shared", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(journal)))
    counted = [t for t in study.trials if ended_as(t) in ("complete", "failed")]
    assert len(counted) == 3
    assert all(ended_as(t) == "beyond the cap" for t in study.trials if t not in counted)


def test_a_stop_after_the_last_step_keeps_the_trials_score(workdir, capsys, monkeypatch):
    """Ctrl-C during a trial's last step or final evaluation: train.py ends the run as it
    would have (exit 0); the trial is complete with the run's score, not run again (a resume
    of a finished run is refused), and the search stops."""
    run = workdir / "runs" / "20261207_000000_s-t0"
    (run / "meta").mkdir(parents=True)
    (run / "meta" / "results.json").write_text(json.dumps({
        "full_split_val_loss": 1.5, "training_seconds": 2.0, "steps": 10,
        "end_reason": "finished 10 steps"}))

    def stopped_after_the_last_step(command, log, signals, runs_dir, on_run_folder, **_):
        on_run_folder(run)
        signals.signal_number = signal.SIGINT  # as Ctrl-C in the terminal records it
        return ProcessOutcome(exit_code=0, run=run, error=None)

    monkeypatch.setattr(search, "run_train_process", stopped_after_the_last_step)
    stopped = search_here(workdir, capsys, "--study", "s", "--trials", "2", *TINY_TRIAL,
                          "--max-iters", "10")
    assert stopped.returncode == 130
    (trial,) = load(workdir, "s").trials
    assert ended_as(trial) == "complete" and trial.value == 1.5


def test_a_flag_that_a_searched_switch_can_turn_on_is_taken(workdir):
    """--wandb-project with wandb_logging searched over [false, true]: the trials that turn
    W&B on use it, so the space is not refused for the others."""
    (workdir / "space.yaml").write_text("wandb_logging: {choices: [false, true]}\n")
    flags = [*TINY_TRIAL, "--wandb-project", "mine"]
    with contextlib.chdir(workdir):
        search.check_trial_command(ConfigLoader(), SearchSpace.read(Path("space.yaml")), flags)


def test_a_search_where_no_trial_finishes_ends_with_one_line(workdir, capsys):
    (workdir / "space.yaml").write_text("learning_rate: {low: 0.001, high: 0.01}\n")
    # the config is valid; train.py itself refuses more threads than the machine has cores
    result = search_here(workdir, capsys, "--study", "f", "--trials", "1", *TINY_TRIAL,
                         "--max-iters", "10", "--num-threads", str(os.cpu_count() + 1))
    assert result.returncode == 1
    assert re.search(r"^trial 0: learning_rate=0\.003: failed: num_threads=\d+ but this "
                     r"machine has", result.stdout, re.MULTILINE)
    assert result.stderr.rstrip().splitlines()[-1].startswith(
        "error: no trial of the study finished; see each trial's line above and its log in "
        "runs/search/f")
    assert "Traceback" not in result.stderr


BAD_SPACES = {
    "unknown key": ("learning_rat: {low: 0.001, high: 0.01}",
                    "search space: unknown setting 'learning_rat'; did you mean "
                    "'learning_rate'?"),
    "wrong type": ("n_layer: {low: 1.5, high: 4}",
                   "search space space.yaml: n_layer: low: expected an integer, got 1.5"),
    "low above high": ("learning_rate: {low: 0.01, high: 0.001}",
                       "search space space.yaml: learning_rate: low must be below high (got "
                       "low=0.01, high=0.001)"),
    "log from zero": ("dropout: {low: 0.0, high: 0.5, log: true}",
                      "search space space.yaml: dropout: a log range needs low > 0 (got "
                      "low=0.0)"),
    "empty choices": ("schedule: {choices: []}",
                      "search space space.yaml: schedule: choices must be a non-empty list"),
    "a choice of the wrong kind": ("schedule: {choices: [wsd, linear]}",
                                   "search space space.yaml: schedule: expected one of cosine, "
                                   "wsd, got 'linear'"),
    "a range of words": ("schedule: {low: 1, high: 2}",
                         "search space space.yaml: schedule: takes one of cosine, wsd, so it "
                         "has no range"),
    "out of its field's range": ("dropout: {low: 0.1, high: 1.5}",
                                 "search space space.yaml: dropout: dropout must be in [0, 1)"),
    "where trials write": ("runs_dir: {choices: [a, b]}",
                           "search space space.yaml: runs_dir: cannot be part of a search "
                           "space"),
    "unknown range key": ("n_layer: {low: 1, high: 4, steps: 2}",
                          "search space space.yaml: n_layer: unknown key 'steps' in a range"),
    "not a mapping": ("- learning_rate", "search space space.yaml must map train.py settings"),
    "a duration that is not one": ("time_budget: soon",
                                   "search space space.yaml: time_budget: expected a duration "
                                   "such as 300, 300s or 5m or none, got 'soon'"),
    "a number YAML reads as text": ("learning_rate: {low: 1e-3, high: 0.01}",
                                    "learning_rate: low: expected a finite number, got '1e-3' "
                                    "(YAML reads 1e-3 as text: write it as 0.001)"),
    "an integer YAML reads as text": ("max_iters: {low: 1e3, high: 2000}",
                                      "max_iters: low: expected an integer, got '1e3' (YAML "
                                      "reads 1e3 as text: write it as 1000)"),
    "a step that misses high": ("n_layer: {low: 2, high: 7, step: 2}",
                                "n_layer: step must divide high - low, so that high is a value "
                                "the range takes (got low=2, high=7, step=2)"),
    "a fixed value no trial can keep": ("n_head: 3",
                                        "search space space.yaml: n_embd=16 must be divisible "
                                        "by n_head=3"),
    "a flag train.py refuses in every trial": ("wandb_project: mine",
                                               "search space space.yaml: train.py refuses the "
                                               "flags each trial would pass: --wandb-project "
                                               "does nothing while wandb_logging is off"),
}


@pytest.mark.parametrize("case", BAD_SPACES)
def test_a_bad_space_file_is_refused_in_one_line_before_anything_is_made(workdir, capsys,
                                                                          case):
    text, message = BAD_SPACES[case]
    (workdir / "space.yaml").write_text(text + "\n", encoding="utf-8")
    with contextlib.chdir(workdir):
        code = search.main(["--study", "s", "--space", "space.yaml", *TINY_TRIAL])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not (workdir / "runs").exists()


BAD_FLAGS = {
    "in the space and a flag": (["--learning-rate", "0.01"],
                                "learning_rate is both in search space space.yaml and given "
                                "as --learning-rate"),
    "no space file": (["--space", "missing.yaml"], "search space missing.yaml does not exist"),
    "no trials": (["--trials", "0"], "--trials must be at least 1, got 0"),
    "a run tag": (["--run-tag", "x"], "leave --run-tag out"),
    "a study name with a slash": (["--study", "a/b"], "study name 'a/b': use up to 100"),
    "a storage Optuna does not know": (["--storage", "nosuch://x"],
                                       "cannot open the study storage nosuch://x"),
    "a storage under a file": (["--storage", "sqlite:///corpus.txt/s.db"],
                               "--storage's folder corpus.txt is a file, not a folder"),
    "a bad train.py flag": (["--batch-size", "0"], "batch_size"),
    "a train.py flag search does not take": (["--resume", "latest"], "unknown flag --resume"),
    "a sampler seed out of range": (["--sampler-seed", "-1"], "--sampler-seed must be in [0, "),
    "someone else's file as the journal": (["--storage", "corpus.txt"],
                                           "--storage corpus.txt is not an Optuna journal"),
    "a storage in memory": (["--storage", "sqlite:///:memory:"],
                            "--storage sqlite:///:memory: is a database in memory"),
    "a switch-dependent flag the space never turns on": (
        ["--wandb-project", "mine"], "--wandb-project does nothing while wandb_logging is off"),
    "a length in the space and a flag": (["--time-budget", "60"],
                                         "train.py refuses the flags each trial would pass: "
                                         "--max-iters and --time-budget both say how long"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_a_bad_flag_is_refused_in_one_line_before_anything_is_made(workdir, capsys, case):
    flags, message = BAD_FLAGS[case]
    if case == "a length in the space and a flag":
        (workdir / "space.yaml").write_text("max_iters: {low: 10, high: 20}\n")
    if case == "a switch-dependent flag the space never turns on":
        (workdir / "space.yaml").write_text("wandb_logging: {choices: [false]}\n")
    before = sorted(p.name for p in workdir.iterdir())
    with contextlib.chdir(workdir):
        code = search.main(["--study", "s", "--space", "space.yaml", *TINY_TRIAL, *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_a_lost_trial_whose_run_ended_by_itself_is_complete(workdir, capsys, monkeypatch):
    """Its train.py finished the run after the search was gone: the rerun takes the score the
    run wrote instead of resuming a finished run (which train.py refuses)."""
    run = workdir / "runs" / "20261207_000000_s-t0"
    (run / "meta").mkdir(parents=True)
    (run / "artifacts" / "checkpoints").mkdir(parents=True)
    (run / "artifacts" / "checkpoints" / "last.safetensors").write_bytes(b"")
    (run / "meta" / "results.json").write_text(json.dumps({
        "full_split_val_loss": 1.25, "training_seconds": 2.0, "steps": 10,
        "end_reason": "finished 10 steps"}))
    monkeypatch.setattr(search, "run_train_process", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(search, "prepare", lambda study, space, base, runs_dir, signals: (
        study.enqueue_trial({"learning_rate": 0.003, "n_head": 4},
                            user_attrs={"rerun_of": 0, "run": str(run.relative_to(workdir))})))
    result = search_here(workdir, capsys, "--study", "s", "--trials", "1", *TINY_TRIAL,
                         "--max-iters", "10")
    assert result.returncode == 0, result.stderr
    (trial,) = load(workdir, "s").trials
    assert ended_as(trial) == "complete" and trial.value == 1.25


def test_the_baseline_keeps_every_current_value_the_space_allows(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: {low: 0.01, high: 0.1}\nschedule: {choices: [cosine]}\n")
    space = SearchSpace.read(path)
    # a range takes the current value even outside it; a list only one of its choices
    assert space.baseline({"learning_rate": 0.003, "schedule": "wsd"}) == (
        {"learning_rate": 0.003}, ["schedule"])
    # a range cannot hold none (off), nor 0 on a log scale: those are sampled
    path.write_text("weight_decay: {low: 0.0001, high: 0.1, log: true}\n"
                    "head_lr: {low: 0.001, high: 0.1}\n")
    assert SearchSpace.read(path).baseline({"weight_decay": 0.0, "head_lr": None}) == (
        {}, ["weight_decay", "head_lr"])
    assert trial_flags({"learning_rate": 0.1 + 0.2, "bias": False, "head_lr": None}) == [
        "--learning-rate", "0.30000000000000004", "--no-bias", "--head-lr", "none"]
