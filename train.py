"""Train a character-level GPT on a text file, then export it for inference.py.

Usage: python train.py --run-tag baseline --batch-size 16
       python train.py --resume runs/<id>      # continue a stopped run from its last checkpoint
       torchrun --standalone --nproc_per_node=4 train.py ...   # DDP over 4 processes
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.autograd.profiler import record_function
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from data import BatchSampler, Splits, read_text, split_ids
from model import LanguageModel
from tokenizer import CharTokenizer
from utils import console, distributed
from utils.checkpoint import (
    RankState,
    TrainingState,
    prune_step_checkpoints,
    remove_partial_writes,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    save_export,
)
from utils.config import Config, ConfigLoader, TrainConfig
from utils.device import (
    autocast,
    configure_backends,
    measure_matmul_flops,
    resolve_device,
    resolve_dtype,
)
from utils.interrupts import GracefulStop
from utils.nonfinite import NonfiniteGuard
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


@dataclass(frozen=True)
class StepResult:
    """What one step leaves on the device; reading any of it waits for the device."""

    loss: torch.Tensor  # mean loss over the micro-batches
    grad_norm: torch.Tensor  # global gradient norm before clipping
    is_finite: torch.Tensor  # bool; False: the update was skipped


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, is_finite: torch.Tensor) -> None:
    """Apply the update only if is_finite, deciding on the device when the optimizer can."""
    if optimizer.defaults.get("fused"):
        # fused Adam(W) skips its whole update (moments, decay, step count) on the device when
        # found_inf is non-zero: the hook GradScaler uses, so the host never waits
        optimizer.found_inf = (~is_finite).float()
        optimizer.step()
    elif bool(is_finite):  # the one host-device sync, for optimizers without that hook
        optimizer.step()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: BatchSampler,
    cfg: TrainConfig,
    precision: tuple[torch.device, torch.dtype],
    scaler: torch.amp.GradScaler,
) -> StepResult:
    """One optimizer step over grad_accum_steps micro-batches, skipped if anything is non-finite.

    Nothing here waits for the device (with a fused optimizer), so the host queues the next
    step while this one runs. The named ranges are the phases profile_model.py reports.
    """
    with record_function("optimizer"):
        # zeroed here rather than after the update, so the step's gradients can be inspected
        optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=precision[0])
    for micro_step in range(cfg.grad_accum_steps):
        with record_function("data"):
            x, y = batches.next_batch()
        # under DDP, gradients are averaged over ranks in the last micro-step's backward only
        with distributed.gradient_sync(model, enabled=micro_step == cfg.grad_accum_steps - 1):
            with record_function("forward"), autocast(*precision):
                _, loss = model(x, y)
                # grads are summed over micro-steps, so scale each loss to keep the mean
                loss = loss / cfg.grad_accum_steps
            with record_function("backward"):
                scaler.scale(loss).backward()
        total_loss += loss.detach()
    with record_function("optimizer"):
        # averaged over ranks: a non-finite loss on any rank makes the mean non-finite, so
        # every rank skips the same steps and the replicas never diverge
        total_loss = distributed.mean_over_ranks(total_loss)
        scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        is_finite = torch.isfinite(total_loss) & torch.isfinite(grad_norm)
        if scaler.is_enabled():
            # float16: the GradScaler skips overflowing steps itself and lowers its scale
            scaler.step(optimizer)
        else:
            step_unless_nonfinite(optimizer, is_finite)
        scaler.update()
    return StepResult(total_loss, grad_norm, is_finite)


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    block_size: int,
    precision: tuple[torch.device, torch.dtype],
) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches of each split, in eval mode.

    Under torchrun each rank evaluates its own batches and the means are averaged, so the
    estimate rests on eval_iters x world_size batches."""
    model.eval()
    losses = {}
    seed = cfg.seed + EVAL_SEED_OFFSET + distributed.rank()
    for name, data in (("train", splits.train), ("val", splits.val)):
        sampler = BatchSampler(data, block_size, cfg.batch_size, seed, precision[0])
        total = torch.zeros((), device=precision[0])
        for _ in range(cfg.eval_iters):
            x, y = sampler.next_batch()
            with autocast(*precision):
                _, loss = model(x, y)
            total += loss
        losses[name] = distributed.mean_over_ranks(total).item() / cfg.eval_iters
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


def init_state(config: Config, splits: Splits, device: torch.device,
               dtype: torch.dtype) -> TrainingState:
    cfg = config.train
    # each rank draws its own batches and dropout masks; DDP gives every rank rank 0's weights
    seed = cfg.seed + distributed.rank()
    seed_everything(seed)
    model = LanguageModel(config.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    return TrainingState(
        model=model,
        step_model=torch.compile(model) if cfg.compile else model,
        optimizer=optimizer,
        scheduler=LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.learning_rate),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        batches=BatchSampler(splits.train, config.model.block_size, cfg.batch_size, seed, device),
    )


def build_parser(loader: ConfigLoader) -> argparse.ArgumentParser:
    parser = loader.build_parser(__doc__)
    parser.add_argument(
        "--resume", metavar="RUN",
        help="continue runs/<id> (or 'latest') from its last checkpoint, in the same folder; "
             "only watch-and-length settings such as --max-iters may change")
    return parser


def train(argv: Sequence[str]) -> int:
    launch = distributed.current_launch()
    loader = ConfigLoader()
    args = build_parser(loader).parse_args(argv)
    if args.resume:
        run, checkpoint, config = resolve_resume(args.resume, loader, args, launch.world_size)
    else:
        run, checkpoint, config = None, None, loader.load(args)
    cfg = config.train
    threads = cfg.num_threads or distributed.threads_per_process(launch)
    if threads is not None:
        torch.set_num_threads(threads)
    device = distributed.device_for_rank(resolve_device(cfg.device), launch)
    configure_backends(device)
    precision = (device, resolve_dtype(cfg.dtype, device))
    config, tokenizer, splits = prepare(config)
    if cfg.aim_logging:
        check_aim_available()
    state = init_state(config, splits, *precision)
    if checkpoint is not None:
        restore_checkpoint(state, checkpoint, config, tokenizer, launch.rank)
    # every input is valid: only now do processes join up and the run get (or touch) a folder
    with distributed.process_group(launch, device) as group:
        state.step_model = group.wrap(state.step_model, device)
        resumed_at_step = state.step if checkpoint else None
        command = command_line("train.py", argv, launcher=launch.launcher())
        run, metadata = distributed.on_main(
            lambda: open_run(run, config, command, resumed_at_step))
        console.info(f"{'resuming' if checkpoint else 'run'} {run.run_id} at step {state.step}: "
                     + describe(state, config, tokenizer, precision))
        tracker = Tracker.open(run, config, metadata, resume_step=resumed_at_step)
        return train_and_export(state, splits, config, precision, tracker, run, tokenizer)


def train_and_export(
    state: TrainingState, splits: Splits, config: Config,
    precision: tuple[torch.device, torch.dtype], tracker: Tracker, run: RunPaths,
    tokenizer: CharTokenizer,
) -> int:
    """The training loop, then the final checkpoint, export and report; the exit code."""
    launcher = shlex.join(distributed.current_launch().launcher())
    resume_command = f"{launcher} train.py --resume {run.root}"
    try:
        with GracefulStop() as stop:
            end = training_loop(state, splits, config, precision, tracker, run, tokenizer, stop)
            console.info(f"training ended at step {state.step}: {end}")
            tracker.log_text("end_reason", end, state.step)
            if state.last_saved_step != state.step:
                write_checkpoints(run, state, config, tokenizer, [f"step_{state.step}", "last"])
            distributed.on_main(lambda: save_export(run.export, state.model, tokenizer))
        tracker.log_summary(flat_hparams(config), {
            "hparams/final_val_loss": state.last_losses.get("val", math.nan),
            "hparams/best_val_loss": state.best_val_loss,
        })
    except KeyboardInterrupt:
        console.warn("interrupted again: quitting at once; resume from the last checkpoint "
                     f"with {resume_command}")
        return INTERRUPTED_EXIT_CODE
    finally:
        tracker.close()
    distributed.on_main(lambda: report(run, state, tokenizer, config.train, precision[0]))
    if stop.requested:
        console.warn(f"stopped by {stop.name} at step {state.step}; resume with "
                     f"{resume_command}")
        return stop.exit_code
    return 0


def describe(state: TrainingState, config: Config, tokenizer: CharTokenizer,
             precision: tuple[torch.device, torch.dtype]) -> str:
    """The model, device and global batch, for the line that starts a run."""
    cfg, world_size = config.train, distributed.world_size()
    global_batch = cfg.global_batch_size(world_size)
    return (f"{state.model.num_parameters() / 1e6:.2f}M parameters, vocab "
            f"{tokenizer.vocab_size}, device {precision[0]}, dtype {str(precision[1])[6:]}, "
            f"{world_size} process(es); global batch {global_batch} sequences "
            f"({cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {world_size}) = "
            f"{global_batch * config.model.block_size} tokens per step")


def open_run(run: RunPaths | None, config: Config, command: str,
             resumed_at_step: int | None) -> tuple[RunPaths, dict[str, str]]:
    """A new run folder, or the resumed one swept of half-written checkpoints, with its
    metadata written; returns the folder and the metadata texts."""
    if run is None:
        run = create_run(Path(config.train.runs_dir), config.train.run_tag)
    else:
        remove_partial_writes(run.checkpoints)
    metadata = write_metadata(run, config.to_dict(), command, resumed_at_step=resumed_at_step)
    return run, metadata


def training_loop(
    state: TrainingState, splits: Splits, config: Config,
    precision: tuple[torch.device, torch.dtype], tracker: Tracker, run: RunPaths,
    tokenizer: CharTokenizer, stop: GracefulStop,
) -> str:
    """Optimizer steps until max_iters, early stopping or a stop signal; returns why it ended."""
    cfg = config.train
    world_size = distributed.world_size()
    tokens_per_step = cfg.global_batch_size(world_size) * config.model.block_size
    # every process measures its own share of the machine; MFU is over all of them
    peak_flops = (cfg.peak_flops or measure_matmul_flops(*precision)) * world_size
    flops_per_token = state.model.flops_per_token()
    guard = NonfiniteGuard(state, precision[0])
    progress = tqdm(total=cfg.max_iters, initial=state.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.5,
                    disable=not distributed.is_main_process())
    window_start, window_steps = time.perf_counter(), 0
    check_stop = True
    try:
        while state.step < cfg.max_iters:
            if check_stop and stop_agreed(stop, precision[0]):
                guard.check(state, cfg, tracker, run)
                return f"stopped by {stop.name}"
            result = train_step(state.step_model, state.optimizer, state.batches, cfg,
                                precision, state.scaler)
            state.scheduler.step()
            state.step += 1
            window_steps += 1
            progress.update(1)
            step = state.step
            guard.record(result.is_finite)
            if cfg.histogram_interval and step % cfg.histogram_interval == 0:
                log_histograms(state.model, tracker, step)
            checkpoint_due = cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0
            eval_due = step % cfg.eval_interval == 0 or step == cfg.max_iters
            log_due = step % cfg.log_interval == 0 or step == cfg.max_iters
            sync_point = log_due or eval_due or checkpoint_due
            if sync_point:
                guard.check(state, cfg, tracker, run)
            # ranks must stop at the same step, so they agree on it only where they wait for
            # the device anyway; a single process checks after every step
            check_stop = sync_point or not distributed.is_active()
            if log_due:
                metrics = {"train/loss": result.loss.item(), "grad_norm": result.grad_norm.item(),
                           "lr": state.optimizer.param_groups[0]["lr"],
                           "tokens_per_sec": window_steps * tokens_per_step
                           / (time.perf_counter() - window_start)}
                metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / peak_flops
                tracker.log(metrics, step)
                val = f"{state.last_losses['val']:.4f}" if state.last_losses else "-"
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", val=val,
                                     lr=f"{metrics['lr']:.2e}",
                                     tok_s=f"{metrics['tokens_per_sec']:,.0f}",
                                     mfu=f"{metrics['mfu']:.0%}")
                window_start, window_steps = time.perf_counter(), 0
            names = []
            if eval_due:
                if evaluate(state, splits, config, precision, tracker, tokenizer):
                    names.append("best")
                window_start, window_steps = time.perf_counter(), 0
            if checkpoint_due:
                names = [f"step_{step}", "last", *names]
            if names:
                write_checkpoints(run, state, config, tokenizer, names)
            if cfg.patience is not None and state.evals_without_improvement >= cfg.patience:
                return (f"early stopping: val loss has not improved by {cfg.min_delta} for "
                        f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})")
        return f"finished {cfg.max_iters} steps"
    finally:
        progress.close()


def stop_agreed(stop: GracefulStop, device: torch.device) -> bool:
    """True if this or any other training process received a stop signal; all then stop as
    if they had received it."""
    signal_number = distributed.max_over_ranks(stop.signal_number or 0, device)
    if signal_number:
        stop.adopt(signal_number)
    return bool(signal_number)


def write_checkpoints(run: RunPaths, state: TrainingState, config: Config,
                      tokenizer: CharTokenizer, names: list[str]) -> None:
    """Save the state under each name; every rank hands rank 0 its random state to keep."""
    if config.train.keep_checkpoints == 0:
        names = [n for n in names if not n.startswith("step_")] or ["last"]
    rank_states = distributed.gather_to_main(RankState.capture(state.batches))

    def save() -> None:
        save_checkpoint(run.checkpoints, names, state, config, tokenizer, rank_states)
        prune_step_checkpoints(run.checkpoints, config.train.keep_checkpoints)

    distributed.on_main(save)
    if "last" in names:
        state.last_saved_step = state.step


def evaluate(
    state: TrainingState, splits: Splits, config: Config,
    precision: tuple[torch.device, torch.dtype], tracker: Tracker, tokenizer: CharTokenizer,
) -> bool:
    """Losses on both splits and a sample, logged at the current step; True if val improved."""
    losses = estimate_loss(state.step_model, splits, config.train, config.model.block_size,
                           precision)
    improved = losses["val"] < state.best_val_loss
    if losses["val"] < state.best_val_loss - config.train.min_delta:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    state.last_losses = losses
    tracker.log({"train/loss_eval": losses["train"], "val/loss": losses["val"],
                 "val/perplexity": math.exp(losses["val"])}, state.step)
    if config.train.sample_tokens and distributed.is_main_process():
        sample = sample_text(state.model, tokenizer, config.train.sample_tokens,
                             config.train.seed, precision[0])
        tracker.log_text("samples", sample, state.step)
    console.info(f"step {state.step}: train loss {losses['train']:.4f}, "
                 f"val loss {losses['val']:.4f}")
    return improved


def log_histograms(model: torch.nn.Module, tracker: Tracker, step: int) -> None:
    """Parameter and gradient distributions; gradients are those of the step just taken."""
    named = list(model.named_parameters())
    tensors = {f"params/{name}": p for name, p in named}
    tensors.update({f"grads/{name}": p.grad for name, p in named if p.grad is not None})
    tracker.log_distributions(tensors, step)


def report(run: RunPaths, state: TrainingState, tokenizer: CharTokenizer, cfg: TrainConfig,
           device: torch.device) -> None:
    """The script's final user-facing output: a sample, the final losses and the run folder."""
    sample = sample_text(state.model, tokenizer, cfg.sample_tokens, cfg.seed, device)
    print(f"--- sample ---\n{sample}\n--------------")
    if state.last_losses:
        print(f"final train loss {state.last_losses['train']:.4f}, "
              f"val loss {state.last_losses['val']:.4f}")
    print(f"run folder: {run.root}")
    print(f"generate more: python inference.py --run {run.root}")


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(train, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
