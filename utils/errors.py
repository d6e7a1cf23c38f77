"""The one exception type for problems a user can fix, and how scripts report it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from utils import console


class UserError(Exception):
    """Bad input (config, files, flags): shown as one line, exit code 2, no traceback."""


class TrainingFailure(Exception):
    """Training cannot go on (diverged, disk full): shown as one line, exit code 1."""


class ConfigFieldError(ValueError):
    """A config value breaks a rule; `fields` names the keys involved so the loader can say
    where each value came from."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


USER_ERROR_EXIT_CODE = 2
TRAINING_FAILURE_EXIT_CODE = 1


def run_main(body: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run a script's body; a UserError becomes one line on stderr and exit code 2, a
    TrainingFailure one line and exit code 1. Anything else is a bug and keeps its traceback."""
    try:
        return body(argv)
    except UserError as error:
        console.error(str(error))
        return USER_ERROR_EXIT_CODE
    except TrainingFailure as error:
        console.error(str(error))
        return TRAINING_FAILURE_EXIT_CODE
