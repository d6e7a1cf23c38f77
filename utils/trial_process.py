"""One search trial: train.py in a process of its own, its output in a log file, and a stop
signal passed on to it so that it stops the way train.py stops (a checkpoint, then exit 130
or 143; a second signal quits at once).

The process runs in a session of its own, so a Ctrl-C at the terminal reaches only the
search, which passes it on exactly once; on Linux it also gets SIGTERM if the search dies, so
a killed search leaves no trial training on its own.

    with StopSignals() as signals:
        outcome = run_train_process(command, log_path, signals, runs_dir, on_run_folder=print)
"""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from utils.interrupts import HANDLED_SIGNALS, CaughtSignals

# train.py's first line about its run: "run <id> at step 0: ..." or "resuming <id> at step N"
RUN_LINE = re.compile(r"^(?:run|resuming) (\S+) at step \d+:", re.MULTILINE)
POLL_SECONDS = 1.0  # how often the log is read for the run folder while the process runs
ALIVE_SECONDS = 60.0  # how often a running trial says so in the study (utils/study.py)
PR_SET_PDEATHSIG = 1


class StopSignals(CaughtSignals):
    """Records SIGINT and SIGTERM, and passes each on to the running process, if any."""

    def __init__(self) -> None:
        super().__init__()
        self.process: subprocess.Popen | None = None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        super()._handle(number, frame)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def stop_process(self) -> None:
        """Stop the running process as SIGTERM stops train.py, without stopping the search."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


@dataclass(frozen=True)
class ProcessOutcome:
    exit_code: int
    run: Path | None  # the run folder train.py made or resumed, if it got that far
    error: str | None  # its last "error: " line, without the prefix


def run_train_process(command: Sequence[str], log_path: Path, signals: StopSignals,
                      runs_dir: Path,
                      on_run_folder: Callable[[Path], None] | None = None,
                      on_alive: Callable[[], None] | None = None,
                      on_start: Callable[[int], None] | None = None) -> ProcessOutcome:
    """Run the command to its end with its output in log_path; on_start is called with the
    process's pid, on_run_folder once the run folder is known, and on_alive every
    ALIVE_SECONDS while it runs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = None
    if signals.requested:  # a stop came after the search chose this trial: it never starts
        return ProcessOutcome(signals.exit_code, None, None)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_stop_with_parent)
        # a stop that came while the process started is passed on here, and one that comes
        # from here on by the handler: held back in between, it is passed on exactly once
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            signals.process = process
            if signals.requested:
                process.send_signal(signals.signal_number)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if on_start is not None:
            on_start(process.pid)
        said_alive = time.monotonic()
        try:
            while True:
                try:
                    process.wait(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if on_alive is not None and time.monotonic() - said_alive >= ALIVE_SECONDS:
                        on_alive()
                        said_alive = time.monotonic()
                finally:
                    if run is None:
                        run = _run_folder(log_path, runs_dir)
                        if run is not None and on_run_folder is not None:
                            on_run_folder(run)
        finally:
            signals.process = None
    text = log_path.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    return ProcessOutcome(process.returncode, run,
                          errors[-1].removeprefix("error: ") if errors else None)


def _run_folder(log_path: Path, runs_dir: Path) -> Path | None:
    match = RUN_LINE.search(log_path.read_text(encoding="utf-8", errors="replace"))
    return Path(runs_dir) / match.group(1) if match else None


def _stop_with_parent() -> None:
    """In the new process, before train.py starts: ask Linux for SIGTERM when the search
    dies, so the trial checkpoints and stops instead of training on alone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
