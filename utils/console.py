"""Human-facing output on stderr that stays readable around an active tqdm progress bar, the
progress bar itself, and run_main, which turns a script's user-facing errors into one line and
an exit code.

Under torchrun only rank 0 speaks, so a message appears once, not once per process; errors
are shown by the first process of each node (local rank 0), as every process there meets the
same ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import torch
from tqdm import tqdm

from utils.distributed import current_launch
from utils.errors import USER_ERRORS, TrainingFailure

USER_ERROR_EXIT_CODE = 2
TRAINING_FAILURE_EXIT_CODE = 1
# Under torchrun every process meets most errors (a bad config, a full disk) at once, and a
# process cannot ask the others whether they failed too once the run is breaking up. So a
# process other than local rank 0 holds its error back this long: if local rank 0 shows the
# same one, torchrun ends this process within the wait and the error appears once; if it is
# still alive afterwards, the error was its own and is shown with its rank.
PEER_ERROR_GRACE_S = 5.0
PROGRESS_DELAY_S = 1.0  # work that ends sooner shows no progress bar


def info(message: str) -> None:
    if current_launch().is_main:
        _write(message)


def warn(message: str) -> None:
    if current_launch().is_main:
        _write(f"warning: {message}")


def _write(line: str) -> None:
    # tqdm.write clears and redraws any live bar, so messages never tear it
    tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def byte_progress(total_bytes: int, title: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over total_bytes, drawn once the work outlasts PROGRESS_DELAY_S and
    gone when it ends; yields the function that advances it (the token store's progress)."""
    with tqdm(total=total_bytes, desc=title, unit="B", unit_scale=True, delay=PROGRESS_DELAY_S,
              leave=False) as bar:
        yield bar.update


def run_main(body: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run a script's body; a user's error (USER_ERRORS) becomes one line on stderr and exit
    code 2, a TrainingFailure one line and exit code 1. So does a file system's refusal that
    no check foresaw (OSError: a name too long, a disk that fills up), and running out of
    memory, each with what to do. Anything else is a bug and keeps its traceback."""
    try:
        return body(argv)
    except USER_ERRORS as failure:
        _report_failure(str(failure))
        return USER_ERROR_EXIT_CODE
    except TrainingFailure as failure:
        _report_failure(str(failure))
        return TRAINING_FAILURE_EXIT_CODE
    except OSError as failure:
        where = f" ({failure.filename})" if failure.filename else ""
        _report_failure(f"the file system refused: {failure.strerror or failure}{where}; "
                        "check the paths given and the free space")
        # a name too long is always a path given that no file system takes
        too_long = failure.errno == errno.ENAMETOOLONG
        return USER_ERROR_EXIT_CODE if too_long else TRAINING_FAILURE_EXIT_CODE
    except (MemoryError, RuntimeError) as failure:
        if not is_out_of_memory(failure):
            raise
        _report_failure("out of memory; lower --batch-size, --block-size or the model's size "
                        "(or --num-samples when generating)")
        return TRAINING_FAILURE_EXIT_CODE


def is_out_of_memory(error: BaseException) -> bool:
    """torch reports a CUDA allocation that failed as OutOfMemoryError, a CPU one as a
    RuntimeError that says so."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error))


def exit_process(code: int) -> NoReturn:
    """End the script with code. A process torchrun started skips the interpreter's teardown:
    gloo's worker threads outlive destroy_process_group, and one that drops the last reference
    to a finished collective's tensor while the interpreter tears down needs the GIL it no
    longer hands out, which aborts the process (SIGABRT, "terminate called without an active
    exception") after all its work is done. Everything the run writes is closed by then."""
    if current_launch().by_torchrun:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def one_line(message: str) -> str:
    """message with every unprintable character written as its escape (a newline as \\n), so
    that whatever a user typed into it, the error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _report_failure(message: str) -> None:
    """Local rank 0 shows the error at once; any other process after PEER_ERROR_GRACE_S."""
    message = one_line(message)
    launch = current_launch()
    if launch.local_rank == 0:
        _write(f"error: {message}")
        return
    time.sleep(PEER_ERROR_GRACE_S)
    _write(f"error: rank {launch.rank}: {message}")
