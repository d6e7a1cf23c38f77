"""The search space of search.py: a YAML file that maps train.py's settings to the values a
trial may take, held to the config fields' own types and rules, and turned into the
distributions Optuna samples.

    learning_rate: {low: 0.001, high: 0.03, log: true}   # a range, sampled on a log scale
    n_layer: {low: 2, high: 6}                            # an integer range (step: 2 for even)
    schedule: {choices: [cosine, wsd]}                    # one of these
    dropout: 0.0                                          # the same in every trial

    space = SearchSpace.read(Path("configs/search/recipe.yaml"))
    space.check(lambda values: loader.load(args, values))   # each value against the rules
    space.trial_values()                                      # one trial's values, all given
    flags = trial_flags({**space.fixed, **trial.params})      # ["--learning-rate", "0.004", ...]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from utils.config import USER_FIELDS
from utils.config_loader import ConfigError, coerce, describe_field, field_type, suggest_key
from utils.config_values import split_optional
from utils.errors import UserError

RANGE_KEYS = ("low", "high", "log", "step")
# what a trial is judged on and where it writes: the same for every trial of a study
NOT_SEARCHABLE = ("data_path", "text_field", "train_split", "full_split_max_tokens",
                  "runs_dir", "run_tag", "token_cache", "aim_repo")


class SearchSpaceError(UserError):
    """The space file is missing, unreadable or breaks a rule."""


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    distributions: dict[str, optuna.distributions.BaseDistribution]  # the searched settings
    fixed: dict[str, Any]  # settings every trial takes as they are

    @classmethod
    def read(cls, path: Path) -> SearchSpace:
        path = Path(path)
        try:
            entries = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SearchSpaceError(f"search space {path} does not exist; pass a YAML file such "
                                   "as configs/search/recipe.yaml") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            detail = " ".join(str(error).split())
            raise SearchSpaceError(f"cannot read search space {path}: {detail}") from None
        if not isinstance(entries, dict) or not entries:
            raise SearchSpaceError(f"search space {path} must map train.py settings to ranges, "
                                   "choices or values, e.g. learning_rate: {low: 0.001, high: "
                                   "0.01, log: true}")
        distributions, fixed = {}, {}
        for key, entry in entries.items():
            where = f"search space {path}: {key}"
            _check_key(key, where)
            if isinstance(entry, dict) and "choices" in entry:
                distributions[key] = _choices(key, entry, where)
            elif isinstance(entry, dict):
                distributions[key] = _range(key, entry, where)
            else:
                fixed[key] = _value(key, entry, where)
        return cls(path, distributions, fixed)

    @property
    def keys(self) -> list[str]:
        return [*self.distributions, *self.fixed]

    def check(self, load: Callable[[Mapping[str, Any]], object]) -> None:
        """The fixed values together, then each value a searched setting names (a range's
        ends, every choice) with them, through `load` (a ConfigLoader's). Fixed values that
        break a rule no searched setting takes part in fail every trial, and so does a value
        that breaks a rule of its own field alone. A rule between fields (n_embd divisible by
        n_head) may hold for other trials: only the trials that break it fail."""
        self._check_loads(load, dict(self.fixed), None)
        named = self.values_named()
        for key in self.distributions:
            for value in named[key]:
                self._check_loads(load, {**self.fixed, key: value}, key)

    def _check_loads(self, load: Callable[[Mapping[str, Any]], object],
                     values: dict[str, Any], key: str | None) -> None:
        try:
            load(values)
        except ConfigError as error:
            fatal = (not set(error.fields) & set(self.distributions) if key is None
                     else set(error.fields) <= {key})
            if fatal:
                where = f"search space {self.path}: " + (f"{key}: " if key else "")
                raise SearchSpaceError(f"{where}{error}") from None

    def trial_values(self) -> dict[str, Any]:
        """Every setting the space names at one value a trial may take (the fixed values, and
        each searched one's low end or first choice): each trial passes all of them to
        train.py as flags."""
        return {key: values[0] for key, values in self.values_named().items()}

    def values_named(self) -> dict[str, list[Any]]:
        named: dict[str, list[Any]] = {key: [value] for key, value in self.fixed.items()}
        for key, distribution in self.distributions.items():
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                named[key] = list(distribution.choices)
            else:
                named[key] = [distribution.low, distribution.high]
        return named

    def describe(self) -> str:
        """The space as one canonical text: a study remembers it, to refuse another."""
        return json.dumps({
            "searched": {key: optuna.distributions.distribution_to_json(d)
                         for key, d in sorted(self.distributions.items())},
            "fixed": dict(sorted(self.fixed.items())),
        }, sort_keys=True)

    def baseline(self, current: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The searched settings at their current values, for the first trial (a range's even
        outside it: Optuna takes a trial's fixed value as it is), and the keys whose current
        value the space cannot hold at all (those are sampled instead)."""
        params, outside = {}, []
        for key, distribution in self.distributions.items():
            if can_hold(distribution, current[key]):
                params[key] = current[key]
            else:
                outside.append(key)
        return params, outside


def can_hold(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Whether a trial of the distribution can take the value: one of its choices, or for a
    range a number (not none, which turns a setting off), above 0 on a log scale."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return value > 0 or not distribution.log


def trial_flags(values: Mapping[str, Any]) -> list[str]:
    """train.py flags that set these values exactly: --x/--no-x for a switch, `none` for None,
    the shortest text that reads back as the same float."""
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, "none" if value is None else repr(value)
                      if isinstance(value, float) else str(value)]
    return flags


def _check_key(key: Any, where: str) -> None:
    if key not in USER_FIELDS:
        raise SearchSpaceError(f"search space: unknown setting '{key}'{suggest_key(str(key))}")
    if key in NOT_SEARCHABLE:
        raise SearchSpaceError(f"{where}: cannot be part of a search space: it says what every "
                               "trial is judged on or where it writes; pass it as a flag of "
                               "search.py instead")


def _value(key: str, raw: Any, where: str) -> Any:
    try:
        return coerce(key, raw, from_text=False, source="the search space")
    except ConfigError:
        integer = split_optional(field_type(key))[1] is int
        raise SearchSpaceError(f"{where}: expected {describe_field(key)}, got "
                               f"{raw!r}{yaml_hint(raw, integer)}") from None


def _choices(key: str, entry: dict, where: str) -> optuna.distributions.CategoricalDistribution:
    extra = sorted(set(entry) - {"choices"})
    if extra:
        raise SearchSpaceError(f"{where}: choices take no other keys (got {', '.join(extra)})")
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise SearchSpaceError(f"{where}: choices must be a non-empty list, e.g. "
                               "{choices: [a, b]}")
    values = [_value(key, raw, where) for raw in choices]
    if len(set(map(repr, values))) < len(values):
        raise SearchSpaceError(f"{where}: choices hold a value twice ({choices})")
    return optuna.distributions.CategoricalDistribution(values)


def _range(key: str, entry: dict, where: str) -> optuna.distributions.BaseDistribution:
    unknown = sorted(set(entry) - set(RANGE_KEYS), key=str)
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key '{unknown[0]}' in a range; a range takes "
                               "low, high, log and step, a list takes choices")
    kind = split_optional(field_type(key))[1]
    if kind not in (int, float):
        raise SearchSpaceError(f"{where}: takes {describe_field(key)}, so it has no range; "
                               "give {choices: [...]} or one value")
    missing = [name for name in ("low", "high") if name not in entry]
    if missing:
        raise SearchSpaceError(f"{where}: a range needs low and high (missing "
                               f"{' and '.join(missing)})")
    low, high = (_number(key, kind, entry[name], f"{where}: {name}") for name in ("low", "high"))
    if not low < high:
        raise SearchSpaceError(f"{where}: low must be below high (got low={low}, high={high})")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log range needs low > 0 (got low={low})")
    step = entry.get("step")
    if step is not None:
        step = _number(key, kind, step, f"{where}: step")
        if step <= 0 or log:
            raise SearchSpaceError(f"{where}: step must be > 0, and a log range takes none "
                                   f"(got step={step}, log={str(log).lower()})")
        steps = (high - low) / step
        if not math.isclose(steps, round(steps), abs_tol=1e-9):
            raise SearchSpaceError(f"{where}: step must divide high - low, so that high is a "
                                   f"value the range takes (got low={low}, high={high}, "
                                   f"step={step})")
    if kind is int:
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(low, high, log=log, step=step)


def _number(key: str, kind: type, raw: Any, where: str) -> int | float:
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if kind is int:
        ok = ok and isinstance(raw, int)
    if not ok or not math.isfinite(raw):
        expected = "an integer" if kind is int else "a finite number"
        raise SearchSpaceError(f"{where}: expected {expected}, got {raw!r}"
                               f"{yaml_hint(raw, kind is int)}")
    return kind(raw)


def yaml_hint(raw: Any, integer: bool = False) -> str:
    """YAML reads 1e-3 (no dot in the mantissa) as text: say so where a number was meant, and
    how to write it (an integer setting's whole number as digits)."""
    if isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            return ""
        if integer and number.is_integer():
            return f" (YAML reads {raw} as text: write it as {int(number)})"
        if math.isfinite(number) and not integer:
            written = repr(number)
            if "e" in written and "." not in written:  # YAML's floats need the dot: 1.0e-05
                written = written.replace("e", ".0e")
            return f" (YAML reads {raw} as text: write it as {written})"
    return ""
