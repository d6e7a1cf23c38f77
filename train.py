"""Train a character-level GPT on a text file, then export it for inference.py.

Usage: python train.py --run-tag baseline --batch-size 16
       python train.py --resume runs/<id>      # continue a stopped run from its last checkpoint
       python train.py --describe-data --data-path books/   # report on the corpus, train nothing
       torchrun --standalone --nproc_per_node=4 train.py ...   # DDP over 4 processes

Read top-down: main -> train (config, setup, time budget, run folder) -> fit (the loop, then
the export) -> training_loop -> what the loop calls -> the report. The training step and the
evaluation live in utils/training.py, the time budget and its pace checks in utils/budget.py.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from data import describe
from tokenizer import CharTokenizer
from utils import budget, console, distributed
from utils.checkpoint import (
    RankState,
    TrainingState,
    prune_step_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    save_export,
)
from utils.config import Config, TrainConfig
from utils.config_loader import ConfigLoader
from utils.errors import TrainingFailure, UserError
from utils.interrupts import GracefulStop
from utils.nonfinite import NonfiniteCounter
from utils.resume import resolve_parent, resolve_resume
from utils.runs import RunPaths, command_line, open_run, write_results
from utils.setup import Setup, build_setup, open_corpus
from utils.tracking import Tracker, check_aim_available, check_wandb_available, flat_hparams
from utils.training import (
    Due,
    SpeedMeter,
    bits_per_character,
    evaluate,
    full_split_loss,
    full_split_windows,
    init_state,
    log_progress,
    optimizer_step,
    run_results,
    sample_text,
)

INTERRUPTED_EXIT_CODE = 130
STOPPED_BY = "stopped by"  # how results.json's end_reason begins for a loop a signal cut short


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(train, sys.argv[1:] if argv is None else argv)


def train(argv: Sequence[str]) -> int:
    """Validate everything, then open the run and fit; the exit code."""
    started = time.perf_counter()  # a time budget counts from here
    launch = distributed.current_launch()
    loader = ConfigLoader()
    args = build_parser(loader).parse_args(argv)
    check_start_flags(args)
    resume = resolve_resume(args.resume, loader, args, launch.world_size) if args.resume else None
    parent = (resolve_parent(args.init_from, args.init_from_checkpoint, loader, args)
              if args.init_from else None)
    # a run that goes on from another keeps that run's vocabulary (it may hold characters this
    # text lacks)
    start = resume or parent
    config, tokenizer = (start.config, start.tokenizer) if start else (loader.load(args), None)
    if args.describe_data:
        return describe_data(config, tokenizer)
    setup = build_setup(config, tokenizer)
    if setup.config.train.aim_logging:
        check_aim_available(setup.config)
    if setup.config.train.wandb_logging:
        check_wandb_available(setup.config)
    state = init_state(setup)
    if resume:
        restore_checkpoint(state, resume.checkpoint, setup.config, setup.tokenizer, launch.rank)
    if parent:
        state.model.load_state_dict(parent.saved.model.state_dict())
    # every input is valid: only now do processes join up and the run get (or touch) a folder
    with distributed.process_group(launch, setup.device) as group:
        state.step_model = group.wrap(state.step_model, setup.device)
        plan = budget.Plan(setup)
        if resume is None and setup.config.train.time_budget is not None:
            plan = budget.fit_to_budget(state, setup, started)
        resumed_at_step = state.step if resume else None
        command = command_line("train.py", argv, launcher=launch.launcher())
        run, metadata = distributed.on_main(lambda: open_run(
            resume.run if resume else None, plan.setup.config, command, resumed_at_step,
            parent.describe() if parent else None))
        console.info(f"{'resuming' if resume else 'run'} {run.run_id} at step {state.step}: "
                     + describe_run(state, plan.setup))
        tracker = Tracker.open(run, plan.setup.config, metadata, resume_step=resumed_at_step)
        if parent:
            console.info(f"fine-tuning {parent.saved.source}")
            evaluate(state, plan.setup, tracker)  # where it starts: the parent's weights here
        return fit(state, plan, run, tracker)


def build_parser(loader: ConfigLoader) -> argparse.ArgumentParser:
    parser = loader.build_parser(__doc__)
    parser.add_argument(
        "--resume", metavar="RUN",
        help="continue runs/<id> (or 'latest') from its last checkpoint, in the same folder; "
             "only watch-and-length settings such as --max-iters may change")
    parser.add_argument(
        "--init-from", metavar="RUN",
        help="fine-tune runs/<id> (or 'latest') in a new run: its weights, tokenizer and model "
             "shape, a fresh optimizer and schedule; e.g. with --data-path new.txt")
    parser.add_argument(
        "--init-from-checkpoint", metavar="NAME",
        help="with --init-from: start from this checkpoint (last, best or step_N) instead of "
             "the run's export")
    parser.add_argument(
        "--describe-data", action="store_true",
        help="print the report on the corpus these flags name (sources, size, vocabulary, "
             "splits, token store), building its token store if needed, and train nothing")
    return parser


def check_start_flags(args: argparse.Namespace) -> None:
    if args.resume and args.init_from:
        raise UserError("--resume continues a run in its own folder and --init-from starts a "
                        "new run from one; pass one of them")
    if args.init_from_checkpoint and not args.init_from:
        raise UserError("--init-from-checkpoint names a checkpoint of the --init-from run; "
                        "pass --init-from RUN too")


def describe_data(config: Config, tokenizer: CharTokenizer | None) -> int:
    """The corpus report (data.describe) on stdout, its token store built on first use."""
    print("\n".join(describe(open_corpus(config, tokenizer))))
    return 0


def fit(state: TrainingState, plan: budget.Plan, run: RunPaths, tracker: Tracker) -> int:
    """The training loop, then the final checkpoint, export and report; the exit code."""
    resume_command = (f"{shlex.join(distributed.current_launch().launcher())} train.py "
                      f"--resume {run.root}")
    end = "interrupted again: quit at once"  # what results.json says if nothing below ends
    try:
        with GracefulStop() as stop:
            try:
                end = training_loop(state, plan, run, tracker, stop)
            except TrainingFailure as failure:
                end = str(failure)
                raise
            setup = plan.setup  # with the max_iters the run ended with
            tracker.log_text("end_reason", end, state.step)
            # a stop that came during the last step ends the run as it would have ended
            cut_short = end.startswith(STOPPED_BY)
            if not cut_short:
                full = state.last_losses["val_full"] = full_split_loss(state.step_model, setup)
                tracker.log({"val/loss_full": full, "val/bpc_full": bits_per_character(full)},
                            state.step)
            if state.last_saved_step != state.step:
                write_checkpoints(run, state, setup, [f"step_{state.step}", "last"])
            distributed.on_main(lambda: save_export(run.export, state.model, setup.tokenizer))
        tracker.log_summary(flat_hparams(setup.config), {
            "hparams/final_val_loss": state.last_losses.get("val", math.nan),
            "hparams/best_val_loss": state.best_val_loss,
            "hparams/final_val_loss_full": state.last_losses.get("val_full", math.nan),
            "hparams/final_val_bpc_full": bits_per_character(
                state.last_losses.get("val_full", math.nan)),
        })
    except KeyboardInterrupt:
        console.warn("interrupted again: quitting at once; resume from the last checkpoint "
                     f"with {resume_command}")
        return INTERRUPTED_EXIT_CODE
    finally:
        tracker.close()
        results = run_results(state, plan.setup, end, tracker.lost)
        distributed.on_main(lambda: write_results(run, results))
    distributed.on_main(lambda: report(run, state, plan.setup, tracker.closing_notes))
    if cut_short:
        console.warn(f"{STOPPED_BY} {stop.name} at step {state.step}; resume with "
                     f"{resume_command}")
        return stop.exit_code
    return 0


def training_loop(state: TrainingState, plan: budget.Plan, run: RunPaths, tracker: Tracker,
                  stop: GracefulStop) -> str:
    """Optimizer steps until max_iters, early stopping or a stop signal; returns why it ended.
    A time budget's pace checks may fit max_iters anew on the way, in plan.setup."""
    setup, cfg = plan.setup, plan.setup.config.train
    nonfinite = NonfiniteCounter(state.nonfinite_in_a_row, state.nonfinite_total, setup.device)
    speed = SpeedMeter(setup, state.model)
    clock = budget.LoopClock(state.step)  # paused during evaluations: it times the steps
    check_stop = True
    with tqdm(total=cfg.max_iters, initial=state.step, desc="train", unit="step",
              dynamic_ncols=True, mininterval=0.5,
              disable=not distributed.is_main_process()) as progress:
        while state.step < cfg.max_iters:
            if check_stop and stop_agreed(stop, setup.device):
                check_nonfinite(nonfinite, state, cfg, tracker, run)
                end = f"{STOPPED_BY} {stop.name}"
                break
            result = optimizer_step(state, setup)
            state.scheduler.step()
            state.step += 1
            state.training_seconds = clock.training_seconds()
            progress.update(1)
            speed.steps += 1
            nonfinite.record(result.is_finite)
            if plan.pace is not None and state.step == plan.pace.step:
                budget.check_pace(state, plan, clock, run, tracker)
                setup, cfg = plan.setup, plan.setup.config.train
                progress.total = cfg.max_iters
            due = Due.at(state.step, cfg)
            if due.histograms:
                tracker.log_histograms(state.model, state.step)
            if due.sync_point:
                check_nonfinite(nonfinite, state, cfg, tracker, run)
            # ranks must stop at the same step, so they agree on it only where they wait for
            # the device anyway; a single process checks after every step
            check_stop = due.sync_point or not distributed.is_active()
            if due.log:
                log_progress(state, result, speed, tracker, progress)
            names = []
            if due.evaluation:
                with clock.pause():
                    if evaluate(state, setup, tracker):
                        names.append("best")
                speed.restart()  # the evaluation's time is not training time
            if due.checkpoint:
                names = [f"step_{state.step}", "last", *names]
            if names:
                write_checkpoints(run, state, setup, names)
            if cfg.patience is not None and state.evals_without_improvement >= cfg.patience:
                end = (f"early stopping: val loss has not improved by {cfg.min_delta} for "
                       f"{cfg.patience} evaluations (best {state.best_val_loss:.4f})")
                break
        else:  # no break: every step ran
            end = f"finished {cfg.max_iters} steps"
    console.info(f"training ended at step {state.step}: {end} "
                 f"({clock.training_seconds():.1f}s of steps, evaluations left out)")
    return end


def write_checkpoints(run: RunPaths, state: TrainingState, setup: Setup,
                      names: list[str]) -> None:
    """Save the state under each name; every rank hands rank 0 its random state to keep."""
    cfg = setup.config.train
    if cfg.keep_checkpoints == 0:
        names = [n for n in names if not n.startswith("step_")] or ["last"]
    rank_states = distributed.gather_to_main(RankState.capture(state.batches))

    def save() -> None:
        save_checkpoint(run.checkpoints, names, state, setup.config, setup.tokenizer,
                        rank_states)
        prune_step_checkpoints(run.checkpoints, cfg.keep_checkpoints)

    distributed.on_main(save)
    if "last" in names:
        state.last_saved_step = state.step


def check_nonfinite(counter: NonfiniteCounter, state: TrainingState, cfg: TrainConfig,
                    tracker: Tracker, run: RunPaths) -> None:
    """Report the steps skipped since the last check; too many in a row end training."""
    new = counter.read()
    state.nonfinite_in_a_row, state.nonfinite_total = counter.in_a_row, counter.total
    if not new:
        return
    tracker.log({"nonfinite_steps": state.nonfinite_total}, state.step)
    console.warn(f"step {state.step}: {new} step(s) with a non-finite loss or gradient "
                 f"skipped since the last check ({state.nonfinite_in_a_row} in a row now, "
                 f"{state.nonfinite_total} in all)")
    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingFailure(
            f"training stopped: {state.nonfinite_in_a_row} non-finite steps in a row at "
            f"step {state.step}; the last good checkpoint is in {run.checkpoints}. Lower "
            "--learning-rate or --grad-clip, or check the data"
        )


def stop_agreed(stop: GracefulStop, device: torch.device) -> bool:
    """True if this or any other training process received a stop signal; all then stop as
    if they had received it."""
    signal_number = distributed.max_over_ranks(stop.signal_number or 0, device)
    if signal_number:
        stop.adopt(signal_number)
    return bool(signal_number)


def describe_run(state: TrainingState, setup: Setup) -> str:
    """The model, device and global batch, for the line that starts a run."""
    cfg, world_size = setup.config.train, distributed.world_size()
    return (f"{state.model.num_parameters() / 1e6:.2f}M parameters, vocab "
            f"{setup.tokenizer.vocab_size}, device {setup.device}, dtype {setup.dtype_name}, "
            f"{world_size} process(es); global batch {cfg.global_batch_size(world_size)} "
            f"sequences ({cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {world_size})"
            f" = {setup.tokens_per_step()} tokens per step")


def report(run: RunPaths, state: TrainingState, setup: Setup, notes: list[str]) -> None:
    """The script's final user-facing output: a sample, the final losses, the run folder and
    what the trackers have to say."""
    if state.last_sample is not None and state.last_sample[0] == state.step:
        sample = state.last_sample[1]
    else:
        sample = sample_text(state.model, setup, setup.config.train.sample_tokens)
    print(f"--- sample ---\n{sample}\n--------------")
    losses = state.last_losses
    if losses:
        full = ""
        if "val_full" in losses:
            scored = full_split_windows(setup) * setup.config.model.block_size
            part = (f" (first {scored:,} of {len(setup.splits.val):,} val tokens)"
                    if scored + setup.config.model.block_size < len(setup.splits.val) else "")
            full = (f", full-split val loss {losses['val_full']:.4f}{part}, "
                    f"{bits_per_character(losses['val_full']):.3f} bits per character")
        print(f"final train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{full}")
    print(f"run folder: {run.root}")
    print(f"generate more: python inference.py --run {run.root}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    console.exit_process(main())
