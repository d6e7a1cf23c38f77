"""Every folder a script writes to, checked before any work starts: a script that would fail
to write its results fails at once, in one line, with nothing written.

    check_output_folder(Path("runs"), "--runs-dir")                  # runs/ or a new one
    check_output_folder(out, "--out", replaceable=is_export_folder)  # replaced as a whole

A folder may exist (the script adds to it) or be made, with any parents missing; the check
refuses a path that is a file, a parent that is a file, a name the file system cannot hold,
and a place this process cannot write, and it probes the writing for real (a folder made and
removed), since permissions alone do not say so (root, read-only mounts, /proc). A folder a
script replaces as a whole must be empty or one the script wrote itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from utils.errors import UserError


class OutputPathError(UserError):
    """A script cannot write where it was told to."""


def check_output_folder(path: Path | str, flag: str,
                        replaceable: Callable[[Path], bool] | None = None) -> Path:
    """path, once it is sure a folder can be there and be written; with replaceable, a
    folder already there must be empty or pass it, as it will be replaced."""
    path = Path(path)
    where = f"{flag} {path}"
    existing = nearest_existing(path)
    if existing == path and not path.is_dir():
        raise OutputPathError(f"{where} is a file, not a folder; pass a folder")
    if not existing.is_dir():
        raise OutputPathError(f"{where} cannot be made: {existing} is a file, not a folder")
    check_names(path, existing, where)
    if path.is_dir() and replaceable is not None and any(path.iterdir()) \
            and not replaceable(path):
        raise OutputPathError(f"{where} holds files this script did not write, and writing "
                              "there would replace them; pass a new or empty folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise OutputPathError(f"{where} cannot be written: {existing} does not let this "
                              f"process write in it ({error.strerror}); pass another "
                              "folder") from None
    return path


def nearest_existing(path: Path) -> Path:
    """path or its nearest parent that exists (a relative path's last parent is ".")."""
    return next(candidate for candidate in (path, *path.parents) if exists(candidate))


def exists(path: Path) -> bool:
    """Whether path exists; a name too long for the file system does not."""
    try:
        return path.exists()
    except OSError:
        return False


def check_names(path: Path, existing: Path, where: str) -> None:
    """Each part of path still to be made fits the file system's limit on a name."""
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.parts[len(existing.parts):]:
        if len(os.fsencode(part)) > limit:
            raise OutputPathError(f"{where} cannot be made: the name {part[:20]}... is longer "
                                  f"than the {limit} bytes a file name may have here")
