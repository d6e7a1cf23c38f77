"""Human-facing output on stderr that stays readable around an active tqdm progress bar, and
run_main, which turns a script's user-facing errors into one line and an exit code.

Under torchrun only rank 0 speaks, so a message appears once, not once per process; errors
are shown by the first process of each node (local rank 0), as every process there meets the
same ones.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from utils.distributed import current_launch, is_peer_failure
from utils.errors import TrainingFailure, UserError

USER_ERROR_EXIT_CODE = 2
TRAINING_FAILURE_EXIT_CODE = 1
# how long a process other than local rank 0 holds back its error: if local rank 0 meets the
# same one, it shows it and torchrun ends this process before the wait is over
PEER_ERROR_GRACE_S = 5.0


def info(message: str) -> None:
    if current_launch().is_main:
        _write(message)


def warn(message: str) -> None:
    if current_launch().is_main:
        _write(f"warning: {message}")


def _write(line: str) -> None:
    # tqdm.write clears and redraws any live bar, so messages never tear it
    tqdm.write(line, file=sys.stderr)


def run_main(body: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run a script's body; a UserError becomes one line on stderr and exit code 2, a
    TrainingFailure one line and exit code 1. Anything else is a bug and keeps its traceback."""
    try:
        return body(argv)
    except UserError as failure:
        _report_failure(str(failure))
        return USER_ERROR_EXIT_CODE
    except TrainingFailure as failure:
        _report_failure(str(failure))
        return TRAINING_FAILURE_EXIT_CODE
    except RuntimeError as failure:
        if not (current_launch().by_torchrun and is_peer_failure(failure)):
            raise
        _report_failure("another training process quit (its error is above, or in torchrun's "
                        "summary below)")
        return TRAINING_FAILURE_EXIT_CODE


def _report_failure(message: str) -> None:
    """Local rank 0 shows the error at once. Any other process first gives local rank 0 the
    time to fail the same way (torchrun then ends it), and shows the error, with its rank, only
    if it is still running: then the error was its own."""
    launch = current_launch()
    if launch.local_rank == 0:
        _write(f"error: {message}")
        return
    time.sleep(PEER_ERROR_GRACE_S)
    _write(f"error: rank {launch.rank}: {message}")
