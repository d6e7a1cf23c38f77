"""The Optuna study behind search.py: where it is stored, what each trial records, and which
trials count toward the study's cap or must be run again.

Each trial keeps user attributes that say how it ended ("ended": complete, failed, interrupted
or lost), its run folder ("run"), its error line ("error"), its bits per character, seconds
and steps, and the host and process that ran it. An interrupted trial (Ctrl-C) and a lost one
(its search process was killed) are run again when the study continues, resuming their run
folder where it has a checkpoint: they do not count toward --trials, their second run does.

    storage = open_storage(storage_url(None, Path("runs")))
    study = open_study("lr", storage, space.describe(), flags, command, sampler)
    mark_lost_trials(study)
    queue_reruns(study, Path("runs"))
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from utils.config import RUN_TAG_PATTERN
from utils.errors import UserError
from utils.output_paths import check_output_folder

SEARCH_FOLDER = "search"  # under the runs folder: the default storage and the trials' logs
RERUN_ENDS = ("interrupted", "lost")
BEYOND_CAP = "beyond the cap"
# a running trial's search writes "alive_at" (seconds since the epoch) every ALIVE_SECONDS
# (utils/trial_process.py); one silent this long, on any machine, was left by a search that
# is gone. Far longer than the interval: machines' clocks differ a little, and a storage can
# be slow to answer
STALE_SECONDS = 15 * 60
# a trial's train.py outlives its killed search while it checkpoints (Linux sends it SIGTERM):
# its run folder is resumed only once it has stopped
ORPHAN_WAIT_SECONDS = 120
DUPLICATE = "a duplicate"  # queued twice by two processes continuing the study at once


class StudyError(UserError):
    """The study cannot be opened, or not with these settings."""


def check_study_name(name: str) -> None:
    """Trial run folders are named <id>_<study>-t<N>, so a study name follows run_tag's rule."""
    if not RUN_TAG_PATTERN.fullmatch(name) or len(name) > 100:
        raise StudyError(f"study name {name!r}: use up to 100 letters, digits, '.', '_' and "
                         "'-', starting with a letter or digit")


def storage_url(given: str | None, runs_dir: Path) -> str:
    """The storage to open: --storage as given, or a SQLite file under the runs folder."""
    if given:
        return given
    return f"sqlite:///{search_folder(runs_dir) / 'studies.db'}"


def search_folder(runs_dir: Path, study: str | None = None) -> Path:
    """Where searches keep their default storage (and, per study, the trials' logs)."""
    folder = Path(runs_dir) / SEARCH_FOLDER
    return folder / study if study else folder


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: a database URL (sqlite:///file.db, postgresql://..., mysql://...),
    or a journal file path for processes that share a disk. Its folder must exist or be
    creatable; anything else that refuses it is one line."""
    if "://" not in url:
        path = Path(url)
        check_output_folder(path.parent, "--storage's folder")
        check_journal(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(url))
        except ValueError as error:  # a journal cut short, or written by something else
            raise StudyError(f"cannot read the study journal {url}: {error}") from None
    if url in ("sqlite://", "sqlite:///") or url.startswith("sqlite:///:memory:"):
        raise StudyError(f"--storage {url} is a database in memory, which ends with this "
                         "process, and a study must outlive it; pass sqlite:///FILE.db")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        check_output_folder(path.parent, "--storage's folder")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as error:
        detail = " ".join(str(error).split("\n")[0].split())
        raise StudyError(f"cannot open the study storage {url}: {detail}; pass --storage "
                         "sqlite:///FILE.db, a database URL Optuna takes, or a journal file "
                         "path") from None


def check_journal(path: Path) -> None:
    """An existing --storage file must be an Optuna journal: a search appends to it, and
    must not append to someone else's file."""
    if not path.exists():
        return
    if not path.is_file():
        raise StudyError(f"--storage {path} is a folder; name a journal file, or pass a "
                         "database URL such as sqlite:///FILE.db")
    with open(path, "rb") as file:
        first = file.readline()
    try:
        record = json.loads(first) if first else {"op_code": None}
    except ValueError:
        record = None
    if not (isinstance(record, dict) and "op_code" in record):
        raise StudyError(f"--storage {path} is not an Optuna journal; name a new file (it "
                         "becomes one), an existing journal, or a database URL")


def open_study(name: str, storage: optuna.storages.BaseStorage, space: str,
               fixed_flags: list[str], command: str,
               sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """The study `name`, created if new; one that exists must have been started with the
    same space and fixed flags, or its trials would not be comparable."""
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction="minimize", sampler=sampler)
    ours = {"space": space, "fixed_flags": fixed_flags, "command": command}
    if "started_with" not in study.user_attrs:
        # one attribute, written at once: a second process opening the new study at the same
        # moment reads all of it or none
        study.set_user_attr("started_with", ours)
    started_with = study.user_attrs["started_with"]  # read again: the first one written
    differences = (("space", "another search space"), ("fixed_flags", "other fixed flags"))
    for key, differs in differences:
        if started_with[key] != ours[key]:
            raise StudyError(f"study {name} was started with {differs}: "
                             f"{started_with['command']}; continue it with the same ones, "
                             "or name a new --study")
    return study


def ended_as(trial: FrozenTrial) -> str:
    """How the trial ended (complete, failed, interrupted, lost, beyond the cap), or its state
    while it has not. A failed trial without an end of ours was lost: its search was killed
    (mark_lost_trials ends it)."""
    if "ended" in trial.user_attrs:
        return trial.user_attrs["ended"]
    return "lost" if trial.state == TrialState.FAIL else trial.state.name.lower()


def counted(trial: FrozenTrial) -> bool:
    """Whether the trial counts toward --trials: one that started, but not one to run again
    nor one that started when the cap was already reached. A queued trial counts once a
    process takes it."""
    return (trial.state != TrialState.WAITING
            and ended_as(trial) not in (*RERUN_ENDS, BEYOND_CAP, DUPLICATE))


def count_toward_cap(study: optuna.Study, below: int | None = None) -> int:
    """Trials that count toward --trials (those numbered below `below`, if given)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if counted(t) and (below is None or t.number < below))


def mark_lost_trials(study: optuna.Study) -> list[int]:
    """Running trials whose search is gone (running_as) end as lost, to be run again."""
    lost = [trial.number for trial in study.get_trials(deepcopy=False,
                                                       states=(TrialState.RUNNING,))
            if running_as(trial) == LOST]
    for number in lost:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return lost


ALIVE, LOST, TRAINING_ALONE = "alive", "lost", "training alone"


def running_as(trial: FrozenTrial) -> str:
    """What became of a running trial's search: ALIVE; LOST (on this host, its search process
    is gone and so is its train.py; of another host, it has been silent for STALE_SECONDS);
    or TRAINING_ALONE (this host's, its search gone but its train.py still running)."""
    attrs = trial.user_attrs
    if attrs.get("host") != socket.gethostname():
        return LOST if silent_for(trial) > STALE_SECONDS else ALIVE
    if not search_gone(attrs.get("pid", -1)):
        return ALIVE
    return LOST if train_process_ended(attrs.get("train_pid")) else TRAINING_ALONE


def queue_reruns(study: optuna.Study, runs_dir: Path) -> list[int]:
    """Queue interrupted and lost trials, not yet queued, to run again with their values
    (and their run folder, to resume)."""
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("rerun_of") for t in trials}
    reruns = [t for t in trials if ended_as(t) in RERUN_ENDS and t.number not in queued]
    for trial in reruns:
        attrs = {"rerun_of": trial.number}
        if trial.user_attrs.get("baseline"):
            attrs["baseline"] = True
        # a search killed at once may not have recorded the folder: its name says whose it is
        run = trial.user_attrs.get("run") or trial_run_folder(runs_dir, study.study_name,
                                                              trial.number)
        if run:
            attrs["run"] = str(run)
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return [t.number for t in reruns]


def is_duplicate(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether a trial numbered lower was queued for the same purpose: the rerun of the same
    trial, or the baseline. Two processes that continue (or start) a study at the same moment
    can each queue it, since reading the trials and queueing one is not one step; the trial
    numbered lowest runs, the others end as duplicates."""
    attrs = trial.user_attrs
    if "rerun_of" in attrs:
        same = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("rerun_of") == attrs["rerun_of"]]
    elif attrs.get("baseline"):
        same = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("baseline") and "rerun_of" not in t.user_attrs]
    else:
        return False
    return any(t.number < trial.number for t in same)


def trial_run_tag(study: str, number: int) -> str:
    return f"{study}-t{number}"


def trial_run_folder(runs_dir: Path, study: str, number: int) -> Path | None:
    """The newest run folder of trial `number`: <id>_<study>-t<N>, or with the _2, _3...
    that a second run in the same second gets."""
    tag = trial_run_tag(study, number)
    found = [p for p in Path(runs_dir).glob(f"*_{tag}*")
             if re.fullmatch(rf"\d{{8}}_\d{{6}}_{re.escape(tag)}(_\d+)?", p.name)]
    return max(found, key=lambda p: p.name, default=None)


def search_gone(pid: int) -> bool:
    """Whether the search process pid of this host is gone. Asked before this process runs
    a trial: one recorded with this process's own pid was left by an earlier process that had
    it (a container restarted with the same pid)."""
    return pid == os.getpid() or not process_alive(pid)


def train_process_ended(pid: Any) -> bool:
    """Whether a trial's train.py (pid, on this host) has ended; a pid that now runs
    something else than train.py counts as ended."""
    return not (isinstance(pid, int) and runs_train(pid))


def runs_train(pid: int) -> bool:
    """Whether process pid lives and runs train.py (where /proc says what it runs)."""
    if not process_alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc: assume it is the trial's
    except OSError:
        return True
    return b"train.py" in command


def trials_training_alone(study: optuna.Study) -> list[int]:
    """Running trials of this host whose search is gone but whose train.py still runs."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running_as(t) == TRAINING_ALONE]


def wait_for_trials_alone(study: optuna.Study, seconds: float = ORPHAN_WAIT_SECONDS,
                          until: Callable[[], bool] = lambda: False) -> None:
    """Wait up to `seconds` (or until `until()` says so) for the train.py of every trial
    training alone to stop."""
    deadline = time.monotonic() + seconds
    while trials_training_alone(study) and time.monotonic() < deadline and not until():
        time.sleep(0.5)


def silent_for(trial: FrozenTrial) -> float:
    """Seconds since the trial last said it was alive (or started, if it never said so)."""
    said = trial.user_attrs.get("alive_at")
    if not isinstance(said, (int, float)):
        started = trial.datetime_start
        said = started.timestamp() if started is not None else 0.0
    return time.time() - said


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}
