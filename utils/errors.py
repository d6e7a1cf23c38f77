"""The exception types for problems a user can fix; utils/console.py's run_main reports them."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, files, flags): shown as one line, exit code 2, no traceback."""


class TrainingFailure(Exception):
    """Training cannot go on (diverged, disk full): shown as one line, exit code 1."""


class DataError(UserError):
    """The corpus cannot be used for training."""
