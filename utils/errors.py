"""The exception types for problems a user can fix; utils/console.py's run_main reports them."""

from __future__ import annotations

from model import ConfigFieldError
from token_store import DataError
from tokenizer import TokenizerFileError, UnknownCharactersError


class UserError(Exception):
    """Bad input (config, files, flags): shown as one line, exit code 2, no traceback."""


class TrainingFailure(Exception):
    """Training cannot go on (diverged, disk full): shown as one line, exit code 1."""


# Every error a user can fix: UserError and the core's own, which subclass ValueError so that
# the core files need nothing of utils/. A ValueError of any other type is a bug.
USER_ERRORS: tuple[type[Exception], ...] = (
    UserError, ConfigFieldError, DataError, TokenizerFileError, UnknownCharactersError,
)
