"""The one exception type for problems a user can fix, and how scripts report it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from utils import console


class UserError(Exception):
    """Bad input (config, files, flags): shown as one line, exit code 2, no traceback."""


class ConfigFieldError(ValueError):
    """A config value breaks a rule; `fields` names the keys involved so the loader can say
    where each value came from."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


USER_ERROR_EXIT_CODE = 2


def run_main(body: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run a script's body; a UserError becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except UserError as error:
        console.error(str(error))
        return USER_ERROR_EXIT_CODE
