"""Human-facing output on stderr that stays readable around an active tqdm progress bar."""

from __future__ import annotations

import sys

from tqdm import tqdm


def info(message: str) -> None:
    _write(message)


def warn(message: str) -> None:
    _write(f"warning: {message}")


def error(message: str) -> None:
    _write(f"error: {message}")


def _write(line: str) -> None:
    # tqdm.write clears and redraws any live bar, so messages never tear it
    tqdm.write(line, file=sys.stderr)
