"""Training tokens/s with no tracker, TensorBoard, and TensorBoard + Aim, side by side.

Runs train.py's training step with every call its loop makes to the tracker (utils/training.py:
the logged metrics, the histograms and the evaluation, where they fall due) on the default
config, with histograms every 50 steps (5x the default rate, so the cost is an upper bound).
Prints one table; BENCHMARKS.md keeps it.
Usage: python bench/tracking_overhead.py [--steps 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.checkpoint import TrainingState  # noqa: E402
from utils.runs import create_run  # noqa: E402
from utils.setup import Setup, setup_from_flags  # noqa: E402
from utils.tracking import AimBackend, TensorBoardBackend, Tracker  # noqa: E402
from utils.training import (  # noqa: E402
    Due,
    SpeedMeter,
    evaluate,
    init_state,
    log_progress,
    optimizer_step,
)

MODES = ("none", "tensorboard", "tensorboard+aim")


def tokens_per_second(mode: str, steps: int, workdir: Path) -> float:
    setup = setup_from_flags([
        "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "10",
        "--sample-tokens", "100", "--histogram-interval", "50", "--checkpoint-interval", "none",
        "--keep-checkpoints", "0"])
    state = init_state(setup)
    run = create_run(workdir / "runs", mode.replace("+", "_"))
    backends = []
    if mode != "none":
        backends.append(TensorBoardBackend(run.tensorboard))
    if mode == "tensorboard+aim":
        backends.append(AimBackend(run, workdir, resuming=False))
    tracker = Tracker(backends)
    for backend in backends:
        backend.start(setup.config, {"command": "bench"})
    start = time.perf_counter()
    train_steps(state, setup, tracker)
    tracker.close()
    elapsed = time.perf_counter() - start
    return steps * setup.tokens_per_step() / elapsed


def train_steps(state: TrainingState, setup: Setup, tracker: Tracker) -> None:
    """max_iters steps of train.py's loop as the tracker sees it."""
    cfg = setup.config.train
    speed = SpeedMeter(setup, state.model)
    with tqdm(disable=True) as progress:
        while state.step < cfg.max_iters:
            result = optimizer_step(state, setup)
            state.scheduler.step()
            state.step += 1
            speed.steps += 1
            due = Due.at(state.step, cfg)
            if due.histograms:
                tracker.log_histograms(state.model, state.step)
            if due.log:
                log_progress(state, result, speed, tracker, progress)
            if due.evaluation:
                evaluate(state, setup, tracker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved, so drifting machine speed hits every mode alike
                rates[mode].append(tokens_per_second(mode, args.steps, Path(tmp)))
    baseline = statistics.median(rates["none"])
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, default config, {args.steps} steps x {args.repeats} (median)")
    print("| tracking | tokens/s | vs none |")
    print("|---|---|---|")
    for mode in MODES:
        rate = statistics.median(rates[mode])
        print(f"| {mode} | {rate:,.0f} | {rate / baseline - 1:+.1%} |")


if __name__ == "__main__":
    main()
