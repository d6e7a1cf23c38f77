"""What every script that trains, profiles or benchmarks starts from: the device and precision
configured for it, and the corpus read, tokenised and split.

    setup = build_setup(config)        # threads, device, backends, dtype, data: in that order
    state = init_state(setup)          # utils/training.py
    with setup.autocast(): ...

train.py, profile_model.py and bench/ all go through build_setup, so what one measures is what
another runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data import Corpus, Splits, load_corpus
from tokenizer import CharTokenizer
from utils import console, distributed
from utils.config import Config
from utils.config_loader import ConfigLoader
from utils.device import (
    autocast,
    check_memory,
    configure_backends,
    resolve_device,
    resolve_dtype,
)
from utils.errors import UserError


@dataclass(frozen=True)
class Setup:
    """A validated config, completed by the corpus (vocab_size), and where and how it runs."""

    config: Config
    tokenizer: CharTokenizer
    splits: Splits
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes in this setup's dtype; a no-op for float32."""
        return autocast(self.device, self.dtype)

    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step, over every process of the launch."""
        return self.config.tokens_per_step(distributed.world_size())


def build_setup(config: Config, tokenizer: CharTokenizer | None = None) -> Setup:
    """CPU threads, then this process's device, its backend switches and the autocast dtype,
    then the corpus (in tokenizer's vocabulary if given, e.g. a run being fine-tuned); the
    returned config carries the tokenizer's vocab_size."""
    launch = distributed.current_launch()
    cfg = config.train
    cores = os.cpu_count() or 1
    if cfg.num_threads is not None and cfg.num_threads > cores:
        raise UserError(f"num_threads={cfg.num_threads} but this machine has {cores} CPU "
                        "cores; pass at most that many, or none for torch's default")
    threads = cfg.num_threads or distributed.threads_per_process(launch)
    if threads is not None:
        torch.set_num_threads(threads)
    device = distributed.device_for_rank(resolve_device(cfg.device), launch)
    check_memory(training_bytes(config), device, "the model, its optimizer and one batch",
                 "lower --n-layer, --n-embd, --batch-size or --block-size")
    configure_backends(device)
    dtype = resolve_dtype(cfg.dtype, device)
    corpus = open_corpus(config, tokenizer)
    model_config = dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size)
    return Setup(dataclasses.replace(config, model=model_config), corpus.tokenizer,
                 corpus.splits, device, dtype)


def training_bytes(config: Config) -> int:
    """A lower bound of the memory one training step takes, in bytes, before the vocabulary
    is known: float32 weights with their gradients and two optimizer moments (16 bytes per
    weight: 12 n_embd^2 per layer), and the activations the backward pass keeps (at least
    eight (batch, block, n_embd) tensors per layer)."""
    model, cfg = config.model, config.train
    weights = 12 * model.n_layer * model.n_embd**2 + model.block_size * model.n_embd
    activations = 8 * cfg.batch_size * model.block_size * model.n_embd * model.n_layer
    return 16 * weights + 4 * activations


def open_corpus(config: Config, tokenizer: CharTokenizer | None = None) -> Corpus:
    """The corpus the config names, through its token store; a build shows a progress bar."""
    cfg = config.train
    return load_corpus(cfg.data_path, cfg.text_field, cfg.train_split, cfg.token_cache,
                       config.model.block_size, tokenizer, console.byte_progress)


def setup_from_flags(flags: Sequence[str]) -> Setup:
    """The setup of the config train.py would load with these flags (benches, tests)."""
    loader = ConfigLoader()
    return build_setup(loader.load(loader.build_parser().parse_args(list(flags))))
