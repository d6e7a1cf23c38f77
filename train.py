"""Train a character-level GPT on a text file, then export it for inference.py.

Usage: python train.py --run-tag baseline --batch-size 16
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from data import BatchSampler, Splits, read_text, split_ids
from model import LanguageModel
from tokenizer import CharTokenizer
from utils import console
from utils.checkpoint import save_export
from utils.config import Config, ConfigLoader, TrainConfig
from utils.device import autocast, resolve_device, resolve_dtype
from utils.errors import run_main
from utils.runs import RunPaths, command_line, create_run, write_metadata
from utils.tracking import Tracker, check_aim_available, flat_hparams

INTERRUPTED_EXIT_CODE = 130
# evaluation batches come from their own fixed seed, so every evaluation sees the same windows
# and the training batch stream is the same whether or not (and how often) we evaluate
EVAL_SEED_OFFSET = 1_000_003


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step`: linear warmup, cosine decay, then min_lr."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.decay_end_step:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_end_step - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0 over the decay
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW that decays weight matrices and embeddings, never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu", "mps"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: BatchSampler,
    cfg: TrainConfig,
    precision: tuple[torch.device, torch.dtype],
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over grad_accum_steps micro-batches.

    Returns the mean loss and the gradient norm as device tensors: reading them (.item())
    waits for the device, so the caller does that only when it logs.
    """
    # zeroed here rather than after the update, so the step's gradients can still be inspected
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=precision[0])
    for _ in range(cfg.grad_accum_steps):
        x, y = batches.next_batch()
        with autocast(*precision):
            _, loss = model(x, y)
        # grads are summed over micro-steps, so scale each loss to keep the mean
        loss = loss / cfg.grad_accum_steps
        scaler.scale(loss).backward()
        total_loss += loss.detach()
    scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    return total_loss, grad_norm


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    block_size: int,
    precision: tuple[torch.device, torch.dtype],
) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches of each split, in eval mode."""
    model.eval()
    losses = {}
    for name, data in (("train", splits.train), ("val", splits.val)):
        sampler = BatchSampler(data, block_size, cfg.batch_size, cfg.seed + EVAL_SEED_OFFSET,
                               precision[0])
        total = torch.zeros((), device=precision[0])
        for _ in range(cfg.eval_iters):
            x, y = sampler.next_batch()
            with autocast(*precision):
                _, loss = model(x, y)
            total += loss
        losses[name] = total.item() / cfg.eval_iters
    model.train()
    return losses


def sample_text(
    model: LanguageModel, tokenizer: CharTokenizer, num_tokens: int, seed: int,
    device: torch.device,
) -> str:
    """A short sample from the model, starting from a newline when the vocabulary has one."""
    start = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
    prompt = torch.tensor([tokenizer.encode(start)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = model.generate(prompt, num_tokens, temperature=0.8, generator=generator)
    model.train(was_training)
    return tokenizer.decode(ids[0, 1:].tolist())


def prepare(config: Config) -> tuple[Config, CharTokenizer, Splits]:
    """Read and check the corpus; the model config gets the tokenizer's vocab_size."""
    cfg = config.train
    text = read_text(Path(cfg.data_path))
    tokenizer = CharTokenizer.from_text(text)
    model_config = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    splits = split_ids(ids, cfg.train_split, model_config.block_size)
    return dataclasses.replace(config, model=model_config), tokenizer, splits


@dataclass
class TrainingState:
    """Everything that changes as training runs."""

    model: LanguageModel  # the plain module: what is saved and exported
    step_model: torch.nn.Module  # what runs the steps: the model itself or its compiled form
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    batches: BatchSampler
    step: int = 0  # optimizer steps completed
    best_val_loss: float = math.inf
    last_losses: dict[str, float] = field(default_factory=dict)


def init_state(config: Config, splits: Splits, device: torch.device,
               dtype: torch.dtype) -> TrainingState:
    cfg = config.train
    seed_everything(cfg.seed)
    model = LanguageModel(config.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    return TrainingState(
        model=model,
        step_model=torch.compile(model) if cfg.compile else model,
        optimizer=optimizer,
        scheduler=LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.learning_rate),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        batches=BatchSampler(splits.train, config.model.block_size, cfg.batch_size, cfg.seed,
                             device),
    )


def train(argv: Sequence[str]) -> int:
    loader = ConfigLoader()
    config = loader.load(loader.build_parser(__doc__).parse_args(argv))
    cfg = config.train
    device = resolve_device(cfg.device)
    precision = (device, resolve_dtype(cfg.dtype, device))
    config, tokenizer, splits = prepare(config)
    if cfg.aim_logging:
        check_aim_available()
    # every input is valid: only now does the run get a folder
    run = create_run(Path(cfg.runs_dir), cfg.run_tag)
    metadata = write_metadata(run, config.to_dict(), command_line("train.py", argv))

    state = init_state(config, splits, *precision)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * config.model.block_size
    console.info(
        f"run {run.run_id}: {state.model.num_parameters() / 1e6:.2f}M parameters, "
        f"vocab {tokenizer.vocab_size}, device {device}, dtype {str(precision[1])[6:]}, "
        f"{tokens_per_step} tokens per step"
    )
    tracker = Tracker.open(run, config, metadata)
    try:
        exit_code = training_loop(state, splits, config, precision, tracker, tokenizer)
        tracker.log_summary(flat_hparams(config), {
            "hparams/final_val_loss": state.last_losses.get("val", math.nan),
            "hparams/best_val_loss": state.best_val_loss,
        })
    finally:
        tracker.close()
    save_export(run.export, state.model, tokenizer)
    sample = sample_text(state.model, tokenizer, cfg.sample_tokens, cfg.seed, device)
    report(run, state.last_losses, sample)
    return exit_code


def training_loop(
    state: TrainingState, splits: Splits, config: Config,
    precision: tuple[torch.device, torch.dtype], tracker: Tracker, tokenizer: CharTokenizer,
) -> int:
    """Run optimizer steps until max_iters or Ctrl-C; return the exit code."""
    cfg = config.train
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * config.model.block_size
    progress = tqdm(total=cfg.max_iters, initial=state.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.5)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while state.step < cfg.max_iters:
            loss, grad_norm = train_step(state.step_model, state.optimizer, state.batches, cfg,
                                         precision, state.scaler)
            state.scheduler.step()
            state.step += 1
            window_steps += 1
            progress.update(1)
            step = state.step
            if cfg.histogram_interval and step % cfg.histogram_interval == 0:
                log_histograms(state.model, tracker, step)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                metrics = {"train/loss": loss.item(), "grad_norm": grad_norm.item(),
                           "lr": state.optimizer.param_groups[0]["lr"],
                           "tokens_per_sec": window_steps * tokens_per_step
                           / (time.perf_counter() - window_start)}
                tracker.log(metrics, step)
                val = f"{state.last_losses['val']:.4f}" if state.last_losses else "-"
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", val=val,
                                     lr=f"{metrics['lr']:.2e}",
                                     tok_s=f"{metrics['tokens_per_sec']:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                evaluate(state, splits, config, precision, tracker, tokenizer)
                window_start, window_steps = time.perf_counter(), 0
    except KeyboardInterrupt:
        progress.close()
        console.warn(f"interrupted after {state.step} steps; exporting the weights trained so far")
        return INTERRUPTED_EXIT_CODE
    progress.close()
    return 0


def evaluate(
    state: TrainingState, splits: Splits, config: Config,
    precision: tuple[torch.device, torch.dtype], tracker: Tracker, tokenizer: CharTokenizer,
) -> None:
    """Losses on both splits and a sample, logged at the current step."""
    losses = estimate_loss(state.step_model, splits, config.train, config.model.block_size,
                           precision)
    state.last_losses = losses
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    tracker.log({"train/loss_eval": losses["train"], "val/loss": losses["val"],
                 "val/perplexity": math.exp(losses["val"])}, state.step)
    if config.train.sample_tokens:
        sample = sample_text(state.model, tokenizer, config.train.sample_tokens,
                             config.train.seed, precision[0])
        tracker.log_text("samples", sample, state.step)
    console.info(f"step {state.step}: train loss {losses['train']:.4f}, "
                 f"val loss {losses['val']:.4f}")


def log_histograms(model: torch.nn.Module, tracker: Tracker, step: int) -> None:
    """Parameter and gradient distributions; gradients are those of the step just taken."""
    named = list(model.named_parameters())
    tensors = {f"params/{name}": p for name, p in named}
    tensors.update({f"grads/{name}": p.grad for name, p in named if p.grad is not None})
    tracker.log_distributions(tensors, step)


def report(run: RunPaths, losses: dict[str, float], sample: str) -> None:
    """The script's final user-facing output: a sample, the final losses and the run folder."""
    print(f"--- sample ---\n{sample}\n--------------")
    if losses:
        print(f"final train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    print(f"run folder: {run.root}")
    print(f"generate more: python inference.py --run {run.root}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(train, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
