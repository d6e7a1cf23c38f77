"""The study behind search.py, in process: a study that refuses another space, trials queued
twice by two searches, trials left running by a search that is gone (on this machine or
another), a trial another search took for lost, and the trial process's stop and heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import search
from utils import trial_process
from utils.study import (
    DUPLICATE,
    STALE_SECONDS,
    StudyError,
    count_toward_cap,
    ended_as,
    is_duplicate,
    mark_lost_trials,
    open_study,
    queue_reruns,
    this_process,
    trials_training_alone,
    wait_for_trials_alone,
)
from utils.trial_process import ProcessOutcome, StopSignals, run_train_process


def journal_study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal")))
    return optuna.create_study(study_name="s", storage=storage)


def test_a_stop_before_a_trial_starts_starts_nothing(tmp_path):
    signals = StopSignals()
    signals.signal_number = signal.SIGINT  # Ctrl-C between choosing the trial and starting it
    log = tmp_path / "t0.log"
    outcome = run_train_process([sys.executable, "-c", "raise SystemExit(3)"], log, signals,
                                tmp_path)
    assert outcome == ProcessOutcome(130, None, None) and not log.exists()


def test_a_study_refuses_to_continue_with_another_space(tmp_path):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal")))
    sampler = optuna.samplers.RandomSampler()
    open_study("s", storage, "space A", ["--max-iters", "10"], "python search.py A", sampler)
    with pytest.raises(StudyError, match=r"^study s was started with another search space: "
                                         r"python search\.py A; continue it with the same"):
        open_study("s", storage, "space B", ["--max-iters", "10"], "python search.py B",
                   sampler)
    # the same space and flags continue it
    open_study("s", storage, "space A", ["--max-iters", "10"], "python search.py A", sampler)


def test_a_rerun_queued_by_two_processes_at_once_runs_once(tmp_path):
    """Two searches continue a study at the same moment, and each queues the interrupted
    trial's rerun (and each a new study's baseline): the one numbered lowest runs, the other
    ends as a duplicate, counted toward nothing and never run again."""
    study = journal_study(tmp_path)
    for _ in range(2):  # both processes found no baseline queued
        study.enqueue_trial({"x": 1.0}, user_attrs={"baseline": True})
    first, second = study.ask(), study.ask()
    assert not is_duplicate(study, first) and is_duplicate(study, second)
    first.set_user_attr("ended", "interrupted")
    study.tell(first, state=TrialState.FAIL)
    second.set_user_attr("ended", DUPLICATE)
    study.tell(second, state=TrialState.FAIL)
    for _ in range(2):  # both processes read the trials before either queued the rerun
        study.enqueue_trial({"x": 1.0}, user_attrs={"rerun_of": first.number, "baseline": True})
    rerun, again = study.ask(), study.ask()
    assert not is_duplicate(study, rerun) and is_duplicate(study, again)
    again.set_user_attr("ended", DUPLICATE)
    study.tell(again, state=TrialState.FAIL)
    assert count_toward_cap(study) == 1  # the rerun alone
    assert queue_reruns(study, tmp_path) == []  # nothing more to run again


def test_a_trial_left_running_with_this_processs_own_pid_is_lost(tmp_path):
    """A container restarted with the same pid: a running trial recorded with this process's
    pid was left by the process before it. One whose process lives is left alone."""
    study = journal_study(tmp_path)
    mine, alive = study.ask(), study.ask()
    for trial, pid in ((mine, os.getpid()), (alive, os.getppid())):
        for key, value in {**this_process(), "pid": pid}.items():
            trial.set_user_attr(key, value)
    assert mark_lost_trials(study) == [mine.number]
    assert [ended_as(t) for t in study.trials] == ["lost", "running"]


def test_a_trial_whose_train_py_outlives_its_search_waits_for_it(tmp_path):
    """The search was killed; its trial's train.py still checkpoints (Linux sent it SIGTERM).
    Until that process ends, the trial is not lost: its run folder is not resumed under it."""
    study = journal_study(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.py"])
    try:
        trial = study.ask()
        for key, value in {**this_process(), "pid": int(gone.stdout),
                           "train_pid": orphan.pid}.items():
            trial.set_user_attr(key, value)
        assert trials_training_alone(study) == [trial.number]
        assert mark_lost_trials(study) == []
        wait_for_trials_alone(study, seconds=0.2)  # it does not stop by itself here
        asked = []  # Ctrl-C: asked once, before any wait
        wait_for_trials_alone(study, until=lambda: asked.append(1) or True)
        assert asked == [1]
        assert trials_training_alone(study) == [trial.number]
    finally:
        orphan.kill()
        orphan.wait()
    assert trials_training_alone(study) == [] and mark_lost_trials(study) == [trial.number]


def test_a_trial_of_another_machine_silent_for_long_is_lost(tmp_path):
    """A search on another machine says every minute that its trial runs; killed, it says
    nothing more, and a search that continues the study later takes the trial for lost."""
    study = journal_study(tmp_path)
    silent, recent, new = study.ask(), study.ask(), study.ask()
    for trial in (silent, recent, new):
        trial.set_user_attr("host", "elsewhere")
        trial.set_user_attr("pid", os.getpid())  # a pid of that machine, not of this one
    silent.set_user_attr("alive_at", time.time() - STALE_SECONDS - 60)
    recent.set_user_attr("alive_at", time.time() - 60)
    assert mark_lost_trials(study) == [silent.number]  # the new one started just now


def test_a_trial_another_search_took_for_lost_ends_in_one_line(tmp_path, capsys):
    """Nothing was heard from this search for STALE_SECONDS (a laptop asleep): another one took
    its trial for lost and runs it again. This one's end is not recorded, and says why."""
    study = journal_study(tmp_path)
    trial = study.ask()
    study.tell(trial.number, state=TrialState.FAIL)  # the other search, marking it lost
    signals = StopSignals()
    search.record(trial, "alive_at", time.time(), signals)  # no process to stop: nothing
    search.finish(study, trial, "complete", value=1.5, seconds=3.0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(
        f"warning: trial {trial.number} was taken for lost by another search while it ran")
    assert ended_as(study.trials[0]) == "lost"


def test_a_running_trial_says_it_is_alive_while_its_process_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(trial_process, "ALIVE_SECONDS", 0.0)
    said = []
    outcome = run_train_process([sys.executable, "-c", "import time; time.sleep(1.5)"],
                                tmp_path / "t0.log", StopSignals(), tmp_path,
                                on_alive=lambda: said.append(time.monotonic()))
    assert outcome.exit_code == 0 and len(said) >= 1
