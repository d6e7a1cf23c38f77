"""The config schema: how to train (TrainConfig), with the model's shape (ModelConfig, in
model.py), as frozen dataclasses that validate themselves, and the sets of fields that resuming
and fine-tuning may change.

    config = Config(model=ModelConfig(vocab_size=65), train=TrainConfig(max_iters=200))

The dataclass defaults are the one statement of the default run; utils/config_loader.py fills
these classes from files, env vars and flags, and utils/config_values.py turns raw values into
the field types.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import CLASSIC_ARCHITECTURE, ConfigFieldError, ModelConfig, check_field_values
from utils.aim_server_run import AIM_SERVER_PATTERN
from utils.config_values import parse_duration
from utils.device import DEVICE_PATTERN, DEVICE_WORDS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)
# two ways to say how long to train: the one set at the higher config layer wins
LENGTH_FIELDS = ("max_iters", "time_budget")
MAX_SEED = 2**32 - 1
RUN_TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# characters W&B refuses in a project name
WANDB_BANNED = "/\\#?%:"


def is_aim_server(aim_repo: str | None) -> bool:
    """Whether aim_repo names an `aim server` (aim://HOST:PORT) rather than a folder."""
    return aim_repo is not None and aim_repo.startswith("aim://")


def names_aim_folder(aim_repo: str) -> bool:
    """Whether an aim_repo value is a folder the run writes to, not an `aim server`."""
    return not is_aim_server(aim_repo)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


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
        default=".cache/tokens", metadata={"help": "folder of token stores: each corpus is "
                                                   "tokenised once, then memory-mapped",
                                           "output_folder": True}
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
                                          "tokens, from the split's start (scoring a large "
                                          "corpus's whole split is slow on a CPU); none = all")
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
        default=None, metadata={"help": "folder holding the Aim repo (.aim), or aim://HOST:PORT "
                                        "of an `aim server`; none = the project root",
                                "output_folder": names_aim_folder, "requires": "aim_logging"}
    )
    wandb_logging: bool = field(
        default=False, metadata={"help": "also track the run in Weights & Biases "
                                         "(pip install wandb)", "aliases": ("--wandb",)}
    )
    wandb_project: str = field(
        default="chargpt", metadata={"help": "the W&B project the run is logged to",
                                     "requires": "wandb_logging"}
    )
    wandb_mode: Literal["auto", "online", "offline"] = field(
        default="auto", metadata={"help": "online: to W&B's servers (needs an API key: wandb "
                                          "login or WANDB_API_KEY); offline: into "
                                          "runs/<id>/logs/wandb, for wandb sync later; auto: "
                                          "online if there is a key, else offline",
                                  "requires": "wandb_logging"}
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
    runs_dir: str = field(default="runs", metadata={"help": "folder holding one folder per run",
                                                     "output_folder": True})

    def __post_init__(self) -> None:
        check_field_values(self)
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
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigFieldError(f"seed must be in [0, {MAX_SEED}] (numpy's seeds)", "seed")
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
            raise ConfigFieldError(f"device must be {DEVICE_WORDS}", "device")
        if not self.wandb_project.strip() or any(c in self.wandb_project for c in WANDB_BANNED):
            raise ConfigFieldError(
                f"wandb_project must be a name without any of {WANDB_BANNED!r}", "wandb_project")
        if self.aim_repo is not None and "://" in self.aim_repo:
            check_aim_server_address(self.aim_repo)
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


def check_aim_server_address(address: str) -> None:
    match = AIM_SERVER_PATTERN.fullmatch(address)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ConfigFieldError(
            "aim_repo takes a folder or an Aim server's address, aim://HOST:PORT with a port "
            "in 1-65535, such as aim://10.0.0.5:53800 (the port `aim server` prints, not the "
            "UI's)", "aim_repo")


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
    "patience", "min_delta", "aim_logging", "aim_repo", "wandb_logging", "wandb_project",
    "wandb_mode", "device", "compile", "runs_dir",
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

# Keys a user may set, each with the dataclass that holds it. vocab_size is not among them: it
# always comes from the tokenizer.
USER_FIELDS: dict[str, type] = {
    **{f.name: ModelConfig for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"},
    **{f.name: TrainConfig for f in dataclasses.fields(TrainConfig)},
}

# Fields naming a folder the run writes to, each with which of its values are folders (True:
# every value; a function of the value, such as aim_repo's, where some name something else):
# the loader checks each folder can be written before any work starts (utils/output_paths.py)
OUTPUT_FOLDER_FIELDS = {name: f.metadata["output_folder"] for name, section in USER_FIELDS.items()
                        for f in dataclasses.fields(section)
                        if f.name == name and f.metadata.get("output_folder")}
