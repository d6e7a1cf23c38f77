"""Raw config values (YAML, JSON, env vars, flags) turned into the types of the config fields,
and the words and argparse metavars (such as INT or SECONDS) that describe those types.

    convert(int | None, {}, "none", from_text=True)     # None
    convert(float, {}, 3, from_text=False)               # 3.0: a file's int is a float
    parse_duration("5m")                                 # 300.0

A field's metadata may name its own "parse" function and the "type" it expects in words
(time_budget's duration).
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal

DURATION_PATTERN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?", re.IGNORECASE)
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}
TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false",
              str: "a string"}


def parse_duration(raw: Any) -> float:
    """Seconds from a number of seconds or text such as 300, 300s, 5m or 1.5h."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return finite(float(raw))
    match = DURATION_PATTERN.fullmatch(raw.strip()) if isinstance(raw, str) else None
    if match is None:
        raise ValueError(f"not a duration: {raw!r}")
    return finite(float(match.group(1)) * SECONDS_PER_UNIT[(match.group(2) or "s").lower()])


def convert(annotation: Any, metadata: Mapping[str, Any], raw: Any, from_text: bool) -> Any:
    """raw as a value of annotation, or a ValueError. Text (env vars, flags) is parsed; a
    file's values must already have the type, except that an int serves for a float."""
    optional, base = split_optional(annotation)
    if optional and (raw is None or (isinstance(raw, str)
                                     and raw.strip().lower() in ("none", "null"))):
        return None
    if "parse" in metadata:
        return metadata["parse"](raw)
    return _as_type(base, raw, from_text)


def split_optional(annotation: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type besides None): `X | None` gives (True, X)."""
    args = typing.get_args(annotation)
    if type(None) in args:  # a Literal's args are its choices, never None
        return True, next(a for a in args if a is not type(None))
    return False, annotation


def _as_type(base: Any, raw: Any, from_text: bool) -> Any:
    if typing.get_origin(base) is Literal:
        if raw in typing.get_args(base):
            return raw
        raise ValueError
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str) and raw.strip().lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[raw.strip().lower()]
        raise ValueError
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            return int(raw)
        raise ValueError
    if base is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return finite(float(raw))
        if from_text and isinstance(raw, str):
            return finite(float(raw))
        raise ValueError
    if base is str:
        if isinstance(raw, str) and raw:
            return raw
        raise ValueError
    raise AssertionError(f"no conversion for config type {base}")


def finite(value: float) -> float:
    """value, or a ValueError for nan or an infinity (such as YAML's .inf or a flag's 1e999):
    every float setting is finite, and `none` turns an optional one off."""
    if not math.isfinite(value):
        raise ValueError(f"not finite: {value}")
    return value


def describe_expected(annotation: Any, metadata: Mapping[str, Any]) -> str:
    """What a value of the field must be, in words: "an integer or none", "one of a, b"."""
    if "type" not in metadata:
        return describe_type(annotation)
    optional, _ = split_optional(annotation)
    return metadata["type"] + (" or none" if optional else "")


def describe_type(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(args)
    if args:  # Optional[X]
        _, base = split_optional(annotation)
        return f"{describe_type(base)} or none"
    return TYPE_NAMES[annotation]


def metavar(name: str, annotation: Any, metadata: Mapping[str, Any]) -> str:
    """The argparse metavar of a field's flag: the value name --help shows, such as INT."""
    if "parse" in metadata:
        return "SECONDS"
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(typing.get_args(annotation)) + "}"
    _, base = split_optional(annotation)
    if base is str:
        return "PATH" if name.endswith(("_path", "_dir")) else "TEXT"
    return {int: "N", float: "X"}[base]


def format_value(value: Any) -> str:
    """A value as a user writes it: None is "none"."""
    return "none" if value is None else str(value)
