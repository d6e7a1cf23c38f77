"""The loader that merges every config layer into the typed, validated dataclasses of
utils/config.py, and the command-line flags it generates from their fields.

Layers, lowest to highest precedence:
    dataclass defaults (ModelConfig in model.py, TrainConfig in utils/config.py)
    -> ./config.json (legacy) -> --config FILE (e.g. configs/presets/gpu.yaml)
    -> CHARGPT_<FIELD> environment variables -> command-line flags
Files are flat mappings of field names to values (YAML or JSON), model and training keys
alike.

    loader = ConfigLoader()
    parser = loader.build_parser(__doc__)    # --config and one flag per field
    config = loader.load(parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model import ConfigFieldError, ModelConfig
from utils.config import (
    FINE_TUNABLE_MODEL_FIELDS,
    LENGTH_FIELDS,
    OUTPUT_FOLDER_FIELDS,
    RESUMABLE_FIELDS,
    SETTINGS_BEFORE_OPTIONS,
    USER_FIELDS,
    Config,
    TrainConfig,
)
from utils.config_values import convert, describe_expected, finite, format_value, metavar
from utils.errors import UserError
from utils.output_paths import check_output_folder

ENV_PREFIX = "CHARGPT_"


class ConfigError(UserError):
    """A config value, key or file is invalid; `fields` names the keys a rule between values
    involves, where one was broken."""

    def __init__(self, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


COMMAND_LINE = "command-line flags"  # the layer of the flags given: _user_layers' last


@dataclass(frozen=True)
class _Layer:
    """Values from one source; `from_text` marks env vars and flags, which arrive as strings."""

    source: str
    values: Mapping[str, Any]
    from_text: bool
    saved_run: bool = False  # a run's saved config: its max_iters was resolved from its budget


class ConfigLoader:
    """Merges the config layers; build a parser, add script-specific flags, then load(args)."""

    def __init__(
        self, cwd: Path | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.cwd = Path.cwd() if cwd is None else Path(cwd)
        self.environ = os.environ if environ is None else environ

    def build_parser(self, description: str | None = None) -> argparse.ArgumentParser:
        """A parser with --config and one flag per config field; its help shows the defaults
        (./config.json's where it sets them)."""
        defaults = self._merge(self._base_layers())
        parser = ArgumentParser(
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        parser.add_argument("--config", metavar="FILE", type=Path,
                            help="YAML or JSON file of config values over the defaults, e.g. "
                                 "configs/presets/gpu.yaml")
        for section, title in ((ModelConfig, "model"), (TrainConfig, "training")):
            group = parser.add_argument_group(f"{title} config (also CHARGPT_<FIELD> env vars)")
            for spec in dataclasses.fields(section):
                if spec.name in USER_FIELDS:
                    _add_flag(group, spec, defaults[spec.name][0])
        return parser

    def load(self, args: argparse.Namespace, overrides: Mapping[str, Any] | None = None,
             overrides_source: str = "overrides") -> Config:
        """The config these args give; `overrides` (typed values, such as a search trial's)
        go over every layer."""
        layers = self._base_layers() + self._user_layers(args)
        if overrides:
            layers.append(_Layer(overrides_source, overrides, from_text=False))
        return _build_config(self._merge(layers))

    def check_layers(self, args: argparse.Namespace) -> None:
        """The rules about where settings come from, before any value's own: which of
        max_iters and time_budget decides the length, and flags that need a switch (--aim-repo
        without --aim); a ConfigError if one is broken."""
        self._merge(self._base_layers() + self._user_layers(args))

    def load_for_resume(self, saved: Mapping[str, Mapping[str, Any]], args: argparse.Namespace,
                        only_resumable_changes: bool = True) -> Config:
        """The saved config of a run, with --config, env vars and flags applied over it; when
        resuming training only RESUMABLE_FIELDS may change."""
        saved_values = {**SETTINGS_BEFORE_OPTIONS}
        saved_values.update({k: v for section in saved.values() for k, v in section.items()
                             if k in USER_FIELDS})
        saved_layer = _Layer("the run's saved config", saved_values, from_text=False,
                             saved_run=True)
        user_layers = self._user_layers(args)
        for layer in user_layers:
            if layer.values.get("time_budget") is not None:
                where = _describe_source(layer, "time_budget")
                raise ConfigError(
                    f"cannot set time_budget when resuming ({where}): the run's budget became "
                    f"max_iters={saved_values.get('max_iters')} when it started; pass "
                    "--max-iters to train longer"
                )
        merged = self._merge([saved_layer, *user_layers])
        for key, (value, source) in merged.items():
            changed = value != saved_values.get(key, value)
            if only_resumable_changes and changed and key not in RESUMABLE_FIELDS:
                saved_value = format_value(saved_values[key])
                raise ConfigError(
                    f"cannot change {key} when resuming (saved {saved_value}, "
                    f"{format_value(value)} from {source}): resuming continues the same model, "
                    f"data and optimizer; start a new run instead. Resumable settings: "
                    f"{', '.join(sorted(RESUMABLE_FIELDS))}"
                )
        return _build_config(merged)

    def load_for_fine_tune(self, parent: ModelConfig, args: argparse.Namespace) -> Config:
        """Defaults and these flags, with the model shape of the run being fine-tuned: a flag
        or file that contradicts it (anything but dropout) is refused, naming the field."""
        kept = {f.name: getattr(parent, f.name) for f in dataclasses.fields(ModelConfig)
                if f.name in USER_FIELDS and f.name not in FINE_TUNABLE_MODEL_FIELDS}
        parent_layer = _Layer("the fine-tuned run's model", kept, from_text=False)
        user_layers = self._user_layers(args)
        merged = self._merge([*self._base_layers(), parent_layer, *user_layers])
        for key, value in kept.items():
            if merged[key][0] != value:
                raise ConfigError(
                    f"cannot set {key}={format_value(merged[key][0])} ({merged[key][1]}) when "
                    f"fine-tuning: the run being fine-tuned has {key}={format_value(value)}, and "
                    "fine-tuning keeps its model shape; leave it out"
                )
        return _build_config(merged)

    def _user_layers(self, args: argparse.Namespace) -> list[_Layer]:
        """--config FILE, then CHARGPT_* environment variables, then flags: the layers a user
        sets for one invocation."""
        layers = []
        if args.config is not None:
            layers.append(self._file_layer(args.config, f"--config {args.config}"))
        layers.append(self._env_layer())
        flags = {k: v for k, v in vars(args).items() if k in USER_FIELDS}
        layers.append(_Layer(COMMAND_LINE, flags, from_text=True))
        return layers

    def _base_layers(self) -> list[_Layer]:
        layers = [_Layer("defaults", {}, from_text=False)]
        legacy = self.cwd / "config.json"
        if legacy.is_file():
            layers.append(self._file_layer(legacy, "./config.json"))
        return layers

    def _file_layer(self, path: Path, source: str) -> _Layer:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
            detail = " ".join(str(error).split())
            raise ConfigError(f"cannot parse config file {path}: {detail}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field names to values")
        return _Layer(source, values, from_text=False)

    def _env_layer(self) -> _Layer:
        values = {}
        for name, value in self.environ.items():
            if name.startswith(ENV_PREFIX):
                values[name[len(ENV_PREFIX):].lower()] = value
        return _Layer("environment", values, from_text=True)

    def _merge(self, layers: Sequence[_Layer]) -> dict[str, tuple[Any, str]]:
        """Field name -> (typed value, where it came from), highest layer winning."""
        merged: dict[str, tuple[Any, str]] = {
            f.name: (f.default, "default")
            for section in (ModelConfig, TrainConfig)
            for f in dataclasses.fields(section) if f.name in USER_FIELDS
        }
        for layer in layers:
            for key, raw in layer.values.items():
                source = _describe_source(layer, key)
                if key not in USER_FIELDS:
                    raise ConfigError(f"unknown config key '{key}' in {source}{suggest_key(key)}")
                merged[key] = (coerce(key, raw, layer.from_text, source), source)
        _settle_length(layers, merged)
        _check_switched_flags(layers, merged)
        return merged


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ConfigError line instead of usage text, and
    holds every flag's value to the rules of the config fields: a float flag takes only a
    finite number, and no flag takes an empty value."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        _hold_to_the_rules(action)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        group = super().add_argument_group(*args, **kwargs)
        _hold_group_to_the_rules(group)
        return group

    def add_mutually_exclusive_group(self, **kwargs: Any) -> argparse._MutuallyExclusiveGroup:
        group = super().add_mutually_exclusive_group(**kwargs)
        _hold_group_to_the_rules(group)
        return group

    def error(self, message: str) -> typing.NoReturn:
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            flag = match.group(1).split("=")[0]
            options = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(flag, options, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag {flag}{hint}")
        raise ConfigError(f"{message}; see --help")


def _hold_to_the_rules(action: argparse.Action) -> None:
    """Wrap the action's conversion (argparse calls `type` on each value's text) in the
    rules; a flag without a value (store_true and the like) has nothing to check."""
    if action.nargs == 0:
        return
    convert_text = action.type or str
    expected = {int: "an integer", float: "a finite number"}.get(convert_text, "a value")

    def checked(text: str) -> Any:
        if text == "":
            raise argparse.ArgumentTypeError("expected a value, got an empty one")
        try:
            value = convert_text(text)
            return finite(value) if convert_text is float else value
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    checked.converts = convert_text  # type: ignore[attr-defined]
    action.type = checked


def _hold_group_to_the_rules(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument

    def add_argument(*args: Any, **kwargs: Any) -> argparse.Action:
        action = add(*args, **kwargs)
        _hold_to_the_rules(action)
        return action

    group.add_argument = add_argument  # type: ignore[method-assign]


def _add_flag(group: argparse._ArgumentGroup, spec: dataclasses.Field, default: Any) -> None:
    """The field's flag (--batch-size for batch_size; --x/--no-x for a bool), which sets the
    field only when given."""
    help_text = f"{spec.metadata['help']} (default: {format_value(default)})"
    flags = ["--" + spec.name.replace("_", "-"), *spec.metadata.get("aliases", ())]
    annotation = field_type(spec.name)
    if annotation is bool:
        group.add_argument(*flags, dest=spec.name, default=argparse.SUPPRESS,
                           action=argparse.BooleanOptionalAction, help=help_text)
    else:
        group.add_argument(*flags, dest=spec.name, default=argparse.SUPPRESS,
                           metavar=metavar(spec.name, annotation, spec.metadata), help=help_text)


def _settle_length(layers: Sequence[_Layer], merged: dict[str, tuple[Any, str]]) -> None:
    """max_iters and time_budget are two ways to say how long to train: the highest layer that
    sets either decides, so --max-iters 200 over a budget trains exactly 200 steps."""
    for layer in reversed(layers):
        sets = [key for key in LENGTH_FIELDS if key in layer.values]
        if sets == ["max_iters"]:
            merged["time_budget"] = (None, _describe_source(layer, "max_iters"))
        both_active = len(sets) == 2 and merged["time_budget"][0] is not None
        if both_active and not layer.saved_run:
            sources = " and ".join(_describe_source(layer, key) for key in LENGTH_FIELDS)
            raise ConfigError(
                f"{sources} both say how long to train (max_iters, time_budget); set one of "
                "them, or time_budget: none to train max_iters steps"
            )
        if sets:
            return


def _check_switched_flags(layers: Sequence[_Layer], merged: dict[str, tuple[Any, str]]) -> None:
    """A flag whose field matters only while a switch is on (its metadata's "requires", such
    as --aim-repo and --aim), given while the switch is off, would do nothing: refuse it. A
    config file or an environment variable may set such a field for runs that turn the
    switch on themselves."""
    given = next((layer.values for layer in layers if layer.source == COMMAND_LINE), {})
    for key in given:
        switch = _field_spec(key).metadata.get("requires")
        if switch is not None and not merged[switch][0]:
            flag, switch_flag = _flag_name(key), _flag_name(switch)
            raise ConfigError(f"{flag} does nothing while {switch} is off; add {switch_flag}, "
                              f"or leave {flag} out", (key,))


def _flag_name(key: str) -> str:
    """The flag a user types for the field: its short alias (--aim) if it has one."""
    aliases = _field_spec(key).metadata.get("aliases", ())
    return aliases[0] if aliases else "--" + key.replace("_", "-")


def _describe_source(layer: _Layer, key: str) -> str:
    if layer.source == "environment":
        return f"env {ENV_PREFIX}{key.upper()}"
    if layer.source == COMMAND_LINE:
        return "--" + key.replace("_", "-")
    return layer.source


def suggest_key(key: str) -> str:
    """"; did you mean 'x'?" for an unknown key, or the list of valid keys."""
    close = difflib.get_close_matches(key, USER_FIELDS, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(USER_FIELDS)}"


@functools.cache
def field_type(name: str) -> Any:
    """The annotation of the config field `name`, such as `int | None` (resolving one takes
    every annotation of its class, so each is resolved once)."""
    return typing.get_type_hints(USER_FIELDS[name])[name]


def _field_spec(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(USER_FIELDS[name]) if f.name == name)


def describe_field(name: str) -> str:
    """What a value of the config field `name` must be, in words ("a duration ... or none")."""
    return describe_expected(field_type(name), _field_spec(name).metadata)


def coerce(key: str, raw: Any, from_text: bool, source: str) -> Any:
    """raw as the field's type; text from env vars and flags is parsed, file values checked."""
    try:
        return convert(field_type(key), _field_spec(key).metadata, raw, from_text)
    except ValueError:
        raise ConfigError(f"{key}: expected {describe_field(key)}, got {raw!r} "
                          f"(from {source})") from None


def _build_config(merged: Mapping[str, tuple[Any, str]]) -> Config:
    """The validated config, once every folder it names for writing can be written."""
    config = Config(model=_build(ModelConfig, merged), train=_build(TrainConfig, merged))
    for name, names_folder in OUTPUT_FOLDER_FIELDS.items():
        path, source = merged[name]
        if path is not None and (names_folder is True or names_folder(path)):
            check_output_folder(path, source if source.startswith("--") else
                                f"{name} (from {source})")
    return config


def _build(section: type, merged: Mapping[str, tuple[Any, str]]) -> Any:
    names = [f.name for f in dataclasses.fields(section) if f.name in USER_FIELDS]
    try:
        return section(**{name: merged[name][0] for name in names})
    except ConfigFieldError as error:
        sources = ", ".join(f"{name}={format_value(merged[name][0])} from {merged[name][1]}"
                            for name in error.fields)
        raise ConfigError(f"{error} ({sources})", error.fields) from None
