"""Training config and the loader that merges every config layer into typed, validated dataclasses.

Layers, lowest to highest precedence:
    dataclass defaults (ModelConfig in model.py, TrainConfig here) -> ./config.json (legacy)
    -> --config FILE (e.g. configs/presets/gpu.yaml) -> CHARGPT_<FIELD> environment variables
    -> command-line flags
The dataclass defaults are the one statement of the default run. Files are flat mappings of
field names to values (YAML or JSON), model and training keys alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model import CLASSIC_ARCHITECTURE, ConfigFieldError, ModelConfig, check_choices
from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "CHARGPT_"
DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DURATION_PATTERN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?", re.IGNORECASE)
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}
# two ways to say how long to train: the one set at the higher config layer wins
LENGTH_FIELDS = ("max_iters", "time_budget")
RUN_TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(UserError):
    """A config value, key or file is invalid."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def parse_duration(raw: Any) -> float:
    """Seconds from a number of seconds or text such as 300, 300s, 5m or 1.5h."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    match = DURATION_PATTERN.fullmatch(raw.strip()) if isinstance(raw, str) else None
    if match is None:
        raise ValueError(f"not a duration: {raw!r}")
    return float(match.group(1)) * SECONDS_PER_UNIT[(match.group(2) or "s").lower()]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. The defaults are the default run (`python train.py`, `make train`)."""

    data_path: str = field(
        default="input.txt", metadata=_help("text to train on: a file, a folder of .txt files, "
                                            "a glob, or a .jsonl file; any of them gzipped")
    )
    text_field: str = field(
        default="text", metadata=_help("the field of each JSONL record that holds its text")
    )
    token_cache: str = field(
        default=".cache/tokens", metadata=_help("folder of token stores: each corpus is "
                                                "tokenised once, then memory-mapped")
    )
    train_split: float = field(
        default=0.9, metadata=_help("fraction of the text used for training; the rest validates")
    )
    batch_size: int = field(default=32, metadata=_help("sequences per micro-batch, per process"))
    sampling: Literal["random", "epochs"] = field(
        default="epochs", metadata=_help("training windows: random = each starts anywhere, "
                                         "drawn independently (nanoGPT's); epochs = every "
                                         "non-overlapping window once per epoch, from a random "
                                         "offset, in random order")
    )
    grad_accum_steps: int = field(
        default=1, metadata=_help("micro-batches per optimizer step, per process "
                                   "(the global batch is batch_size x this x processes)")
    )
    max_iters: int = field(
        default=2000, metadata=_help("optimizer steps to train for; the default run sets them "
                                     "from --time-budget instead")
    )
    time_budget: float | None = field(
        default=280.0, metadata={
            "help": "seconds (or 5m, 1h) for training, evaluations included: a short "
                    "calibration sets max_iters to fit; none = train max_iters steps",
            "parse": parse_duration, "type": "a duration such as 300, 300s or 5m"}
    )
    optimizer: Literal["adamw", "muon"] = field(
        default="muon", metadata=_help("adamw for every parameter, or muon for the blocks' "
                                       "weight matrices and AdamW for the rest")
    )
    learning_rate: float = field(
        default=3e-3, metadata=_help("AdamW's peak learning rate (gains, biases, and any "
                                     "matrix neither Muon nor the two below take)")
    )
    embedding_lr: float | None = field(
        default=0.3, metadata=_help("AdamW's peak learning rate for the token and position "
                                     "embeddings; none = learning_rate")
    )
    head_lr: float | None = field(
        default=None, metadata=_help("AdamW's peak learning rate for an untied output layer; "
                                     "none = learning_rate")
    )
    min_lr: float = field(
        default=0.0, metadata=_help("AdamW's learning rate at the end of the decay; every "
                                    "group ends at the same fraction of its peak")
    )
    muon_lr: float = field(default=0.03, metadata=_help("Muon's peak learning rate"))
    muon_momentum: float = field(default=0.9, metadata=_help("Muon's momentum"))
    muon_weight_decay: float = field(
        default=0.0, metadata=_help("Muon's decoupled weight decay")
    )
    normuon_beta2: float | None = field(
        default=0.95, metadata=_help("NorMuon: each output neuron's Muon update is divided by "
                                     "the RMS of its recent updates (an average with this "
                                     "decay), then the matrix's update is scaled back to its "
                                     "norm; none = plain Muon")
    )
    schedule: Literal["cosine", "wsd"] = field(
        default="wsd", metadata=_help("after warmup: cosine decay to min_lr, or wsd: constant, "
                                      "then linear decay over the last decay_fraction")
    )
    decay_fraction: float = field(
        default=0.6, metadata=_help("wsd: the fraction of the steps spent decaying")
    )
    warmup_iters: int = field(default=20, metadata=_help("steps of linear warmup from 0"))
    lr_decay_iters: int | None = field(
        default=None, metadata=_help("step where the decay reaches min_lr; none = max_iters")
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("AdamW weight decay, applied to its weight matrices and "
                                    "embeddings only")
    )
    beta1: float = field(default=0.8, metadata=_help("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_help("AdamW beta2"))
    grad_clip: float | None = field(
        default=1.0, metadata=_help("max global gradient norm; none = no clipping")
    )
    eval_interval: int = field(default=500, metadata=_help("steps between evaluations"))
    eval_iters: int = field(
        default=20, metadata=_help("batches per split averaged by each evaluation")
    )
    eval_full: bool = field(
        default=False, metadata=_help("evaluations score every non-overlapping window of the "
                                      "val split instead of eval_iters random batches")
    )
    full_split_max_tokens: int | None = field(
        default=1_000_000, metadata=_help("a full-split pass scores at most this many val "
                                          "tokens, from the split's start (a large corpus's "
                                          "split would take hours on a CPU); none = all")
    )
    log_interval: int = field(default=10, metadata=_help("steps between train-loss logs"))
    sample_tokens: int = field(
        default=500, metadata=_help("characters sampled at each evaluation and the end; 0 = off")
    )
    histogram_interval: int = field(
        default=250, metadata=_help("steps between parameter and gradient histograms; 0 = none")
    )
    aim_logging: bool = field(
        default=False, metadata={"help": "also track the run in Aim", "aliases": ("--aim",)}
    )
    aim_repo: str | None = field(
        default=None, metadata=_help("folder holding the Aim repo (.aim); none = the project root")
    )
    checkpoint_interval: int | None = field(
        default=250, metadata=_help("steps between checkpoints; none = only the best and the end")
    )
    keep_checkpoints: int = field(
        default=3, metadata=_help("step_<N> checkpoints kept besides last and best")
    )
    max_nonfinite_steps: int = field(
        default=5, metadata=_help("non-finite losses or gradients in a row before training stops")
    )
    patience: int | None = field(
        default=None, metadata=_help("evaluations without val-loss improvement before stopping "
                                     "early; none = never")
    )
    min_delta: float = field(
        default=0.0, metadata=_help("val-loss decrease that counts as improvement for patience")
    )
    peak_flops: float | None = field(
        default=None, metadata=_help("the device's peak FLOP/s for MFU; none = measure a "
                                     "matmul in the training dtype at startup")
    )
    num_threads: int | None = field(
        default=None, metadata=_help("CPU threads for torch; none = torch's default (all cores)")
    )
    seed: int = field(default=1337, metadata=_help("seed for Python, numpy, torch and batches"))
    device: str = field(default="auto", metadata=_help("auto (cuda, then mps, then cpu), cpu, "
                                                       "cuda, cuda:N or mps"))
    dtype: DType = field(
        default="auto",
        metadata=_help("autocast precision; auto = bfloat16 on CUDA if supported, "
                       "float16 on older CUDA, float32 elsewhere"),
    )
    compile: bool = field(default=False, metadata=_help("torch.compile the model"))
    run_tag: str = field(default="run", metadata=_help("suffix of the run folder name"))
    runs_dir: str = field(default="runs", metadata=_help("folder holding one folder per run"))

    def __post_init__(self) -> None:
        check_choices(self)
        positive = ("batch_size", "grad_accum_steps", "max_iters", "eval_interval",
                    "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigFieldError(f"{name} must be at least 1", name)
        for name in ("warmup_iters", "sample_tokens", "histogram_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(f"{name} must be >= 0", name)
        if not 0.0 < self.train_split < 1.0:
            raise ConfigFieldError("train_split must be between 0 and 1", "train_split")
        if self.learning_rate <= 0:
            raise ConfigFieldError("learning_rate must be > 0", "learning_rate")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigFieldError(
                f"min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]",
                "min_lr", "learning_rate",
            )
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            raise ConfigFieldError(
                f"lr_decay_iters={self.lr_decay_iters} must be >= "
                f"warmup_iters={self.warmup_iters}",
                "lr_decay_iters", "warmup_iters",
            )
        for name in ("checkpoint_interval", "patience", "full_split_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigFieldError(f"{name} must be at least 1 (or none)", name)
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigFieldError("peak_flops must be > 0 (or none to measure)", "peak_flops")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigFieldError("num_threads must be at least 1 (or none)", "num_threads")
        if self.max_nonfinite_steps < 1:
            raise ConfigFieldError("max_nonfinite_steps must be at least 1", "max_nonfinite_steps")
        if self.min_delta < 0:
            raise ConfigFieldError("min_delta must be >= 0", "min_delta")
        for name in ("weight_decay", "muon_weight_decay", "muon_momentum"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(f"{name} must be >= 0", name)
        if self.muon_lr <= 0:
            raise ConfigFieldError("muon_lr must be > 0", "muon_lr")
        for name in ("embedding_lr", "head_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigFieldError(f"{name} must be > 0 (or none for learning_rate)", name)
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigFieldError("decay_fraction must be in (0, 1]", "decay_fraction")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigFieldError("time_budget must be > 0 seconds (or none)", "time_budget")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigFieldError(f"{name} must be in [0, 1)", name)
        if self.normuon_beta2 is not None and not 0.0 <= self.normuon_beta2 < 1.0:
            raise ConfigFieldError("normuon_beta2 must be in [0, 1) (or none for plain Muon)",
                                   "normuon_beta2")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigFieldError("grad_clip must be > 0 (or none to disable)", "grad_clip")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigFieldError(
                "device must be auto, cpu, mps, cuda or cuda:N", "device"
            )
        if not RUN_TAG_PATTERN.fullmatch(self.run_tag):
            raise ConfigFieldError(
                "run_tag may hold letters, digits, '.', '_' and '-' and must start with a "
                "letter or digit", "run_tag",
            )

    def global_batch_size(self, world_size: int = 1) -> int:
        """Sequences per optimizer step over all processes: batch_size and grad_accum_steps
        are per process, so torchrun with N processes takes N times as many."""
        return self.batch_size * self.grad_accum_steps * world_size

    @property
    def decay_end_step(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens in one optimizer step over all processes."""
        return self.train.global_batch_size(world_size) * self.model.block_size


# Settings a resumed run may change: they alter how it is watched and how long it runs, never
# the model, the data or the optimisation so far.
RESUMABLE_FIELDS = frozenset({
    "max_iters", "eval_interval", "eval_iters", "log_interval", "sample_tokens",
    "histogram_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite_steps",
    "patience", "min_delta", "aim_logging", "aim_repo", "device", "compile", "runs_dir",
    "peak_flops", "num_threads", "eval_full", "token_cache", "full_split_max_tokens",
    # resolved to max_iters when the run started; --max-iters on a resume switches it off
    "time_budget",
})

# What a run saved before these settings existed trained with: the GPT-2 layout, AdamW and a
# cosine schedule for max_iters steps, plain Muon where it used Muon, and random windows
SETTINGS_BEFORE_OPTIONS: dict[str, Any] = {
    **CLASSIC_ARCHITECTURE, "optimizer": "adamw", "schedule": "cosine", "time_budget": None,
    "embedding_lr": None, "head_lr": None, "normuon_beta2": None, "sampling": "random",
}

# Model fields a fine-tuning run may set differently from the run it starts from: dropout
# only changes training, not the weights' meaning.
FINE_TUNABLE_MODEL_FIELDS = frozenset({"dropout"})

# Keys a user may set. vocab_size is not among them: it always comes from the tokenizer.
_SECTIONS: dict[str, type] = {
    **{f.name: ModelConfig for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"},
    **{f.name: TrainConfig for f in dataclasses.fields(TrainConfig)},
}


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
                if spec.name not in _SECTIONS:
                    continue
                value = defaults[spec.name][0]
                help_text = f"{spec.metadata['help']} (default: {_format(value)})"
                flags = ["--" + spec.name.replace("_", "-"), *spec.metadata.get("aliases", ())]
                if _field_type(spec.name) is bool:
                    group.add_argument(*flags, dest=spec.name, default=argparse.SUPPRESS,
                                       action=argparse.BooleanOptionalAction, help=help_text)
                else:
                    group.add_argument(*flags, dest=spec.name, default=argparse.SUPPRESS,
                                       metavar=_metavar(spec.name), help=help_text)
        return parser

    def load(self, args: argparse.Namespace) -> Config:
        merged = self._merge(self._base_layers() + self._user_layers(args))
        return Config(model=_build(ModelConfig, merged), train=_build(TrainConfig, merged))

    def load_for_resume(self, saved: Mapping[str, Mapping[str, Any]], args: argparse.Namespace,
                        only_resumable_changes: bool = True) -> Config:
        """The saved config of a run, with --config, env vars and flags applied over it; when
        resuming training only RESUMABLE_FIELDS may change."""
        saved_values = {**SETTINGS_BEFORE_OPTIONS}
        saved_values.update({k: v for section in saved.values() for k, v in section.items()
                             if k in _SECTIONS})
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
                raise ConfigError(
                    f"cannot change {key} when resuming (saved {_format(saved_values[key])}, "
                    f"{_format(value)} from {source}): resuming continues the same model, data "
                    f"and optimizer; start a new run instead. Resumable settings: "
                    f"{', '.join(sorted(RESUMABLE_FIELDS))}"
                )
        return Config(model=_build(ModelConfig, merged), train=_build(TrainConfig, merged))

    def load_for_fine_tune(self, parent: ModelConfig, args: argparse.Namespace) -> Config:
        """Defaults and these flags, with the model shape of the run being fine-tuned: a flag
        or file that contradicts it (anything but dropout) is refused, naming the field."""
        kept = {f.name: getattr(parent, f.name) for f in dataclasses.fields(ModelConfig)
                if f.name in _SECTIONS and f.name not in FINE_TUNABLE_MODEL_FIELDS}
        parent_layer = _Layer("the fine-tuned run's model", kept, from_text=False)
        user_layers = self._user_layers(args)
        merged = self._merge([*self._base_layers(), parent_layer, *user_layers])
        for key, value in kept.items():
            if merged[key][0] != value:
                raise ConfigError(
                    f"cannot set {key}={_format(merged[key][0])} ({merged[key][1]}) when "
                    f"fine-tuning: the run being fine-tuned has {key}={_format(value)}, and "
                    "fine-tuning keeps its model shape; leave it out"
                )
        return Config(model=_build(ModelConfig, merged), train=_build(TrainConfig, merged))

    def _user_layers(self, args: argparse.Namespace) -> list[_Layer]:
        """--config FILE, then CHARGPT_* environment variables, then flags: the layers a user
        sets for one invocation."""
        layers = []
        if args.config is not None:
            layers.append(self._file_layer(args.config, f"--config {args.config}"))
        layers.append(self._env_layer())
        flags = {k: v for k, v in vars(args).items() if k in _SECTIONS}
        layers.append(_Layer("command-line flags", flags, from_text=True))
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
            for f in dataclasses.fields(section) if f.name in _SECTIONS
        }
        for layer in layers:
            for key, raw in layer.values.items():
                source = _describe_source(layer, key)
                if key not in _SECTIONS:
                    raise ConfigError(f"unknown config key '{key}' in {source}{_suggest(key)}")
                merged[key] = (_coerce(key, raw, layer.from_text, source), source)
        _settle_length(layers, merged)
        return merged


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ConfigError line instead of usage text."""

    def error(self, message: str) -> typing.NoReturn:
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            flag = match.group(1).split("=")[0]
            options = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(flag, options, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag {flag}{hint}")
        raise ConfigError(f"{message}; see --help")


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


def _describe_source(layer: _Layer, key: str) -> str:
    if layer.source == "environment":
        return f"env {ENV_PREFIX}{key.upper()}"
    if layer.source == "command-line flags":
        return "--" + key.replace("_", "-")
    return layer.source


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _SECTIONS, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_SECTIONS)}"


def _field_type(name: str) -> Any:
    return typing.get_type_hints(_SECTIONS[name])[name]


def _field_spec(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(_SECTIONS[name]) if f.name == name)


def _coerce(key: str, raw: Any, from_text: bool, source: str) -> Any:
    """raw as the field's type; text from env vars and flags is parsed, file values checked."""
    annotation = _field_type(key)
    args = typing.get_args(annotation)
    optional = type(None) in args  # `X | None`; a Literal's args are its choices, never None
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if isinstance(raw, str) and optional and raw.strip().lower() in ("none", "null"):
        return None
    if raw is None and optional:
        return None
    spec = _field_spec(key)
    try:
        if "parse" in spec.metadata:
            return spec.metadata["parse"](raw)
        return _as_type(base, raw, from_text)
    except ValueError:
        expected = spec.metadata.get("type") or _describe_type(annotation)
        if "type" in spec.metadata and optional:
            expected += " or none"
        raise ConfigError(f"{key}: expected {expected}, got {raw!r} (from {source})") from None


def _as_type(base: Any, raw: Any, from_text: bool) -> Any:
    if typing.get_origin(base) is Literal:
        if raw in typing.get_args(base):
            return raw
        raise ValueError
    if base is bool:
        if isinstance(raw, bool):
            return raw
        words = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}
        if from_text and isinstance(raw, str) and raw.strip().lower() in words:
            return words[raw.strip().lower()]
        raise ValueError
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            return int(raw)
        raise ValueError
    if base is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_text and isinstance(raw, str):
            return float(raw)
        raise ValueError
    if base is str:
        if isinstance(raw, str) and raw:
            return raw
        raise ValueError
    raise AssertionError(f"no conversion for config type {base}")


def _describe_type(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(args)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if args:  # Optional[X]
        base = next(a for a in args if a is not type(None))
        return f"{_describe_type(base)} or none"
    return names[annotation]


def _metavar(name: str) -> str:
    if "parse" in _field_spec(name).metadata:
        return "SECONDS"
    annotation = _field_type(name)
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(typing.get_args(annotation)) + "}"
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if base is str:
        return "PATH" if name.endswith(("_path", "_dir")) else "TEXT"
    return {int: "N", float: "X"}[base]


def _format(value: Any) -> str:
    return "none" if value is None else str(value)


def _build(section: type, merged: Mapping[str, tuple[Any, str]]) -> Any:
    names = [f.name for f in dataclasses.fields(section) if f.name in _SECTIONS]
    try:
        return section(**{name: merged[name][0] for name in names})
    except ConfigFieldError as error:
        sources = ", ".join(
            f"{name}={_format(merged[name][0])} from {merged[name][1]}" for name in error.fields
        )
        raise ConfigError(f"{error} ({sources})") from None
