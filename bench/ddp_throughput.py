"""Training tokens/s with 1, 2, ... processes under torchrun (DDP), against one plain process.

Each row is a real `train.py` run (torchrun for the DDP rows) on the same config; tokens/s
counts every process's tokens and is the median of the logged windows after warm-up. CPU
threads: the plain process uses torch's default (all cores); DDP processes share the cores
(cores / processes each, as train.py sets). Prints one table; BENCHMARKS.md keeps it.

Usage: python bench/ddp_throughput.py [--processes 1 2] [--steps 200] [-- TRAIN_FLAGS...]
       e.g. python bench/ddp_throughput.py --processes 1 2 -- --data-path data.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WARMUP_WINDOWS = 2  # logged windows dropped: allocator, caches, first evaluation


def measure(processes: int | None, steps: int, flags: list[str], workdir: Path) -> float:
    """Median tokens/s of one run; processes None means plain `python train.py`."""
    runs = workdir / f"runs_{processes or 'plain'}"
    launcher = ([sys.executable] if processes is None else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGPT_")}
    command = [*launcher, str(PROJECT_ROOT / "train.py"), "--runs-dir", str(runs),
               "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "5",
               "--log-interval", "10", "--sample-tokens", "0", "--checkpoint-interval", "none",
               "--keep-checkpoints", "0", "--histogram-interval", "0", *flags]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stderr[-2000:]}")
    (events,) = runs.glob("*/logs/tensorboard/events.out.tfevents.*")
    windows = EventAccumulator(str(events)).Reload().Scalars("tokens_per_sec")
    return statistics.median(w.value for w in windows[WARMUP_WINDOWS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="DDP process counts to measure besides the plain process")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("train_flags", nargs="*", help="flags passed on to train.py")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {platform.processor() or platform.machine()}, {cores} cores, torch "
          f"{torch.__version__}, cuda {torch.cuda.is_available()}; train.py "
          f"{' '.join(args.train_flags) or '(default config)'}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = measure(None, args.steps, args.train_flags, Path(tmp))
        print("| launch | processes | tokens/s (all processes) | vs plain |")
        print("|---|---:|---:|---:|")
        print(f"| python train.py | 1 | {baseline:,.0f} | 1.00x |")
        for processes in args.processes:
            rate = measure(processes, args.steps, args.train_flags, Path(tmp))
            print(f"| torchrun --nproc_per_node={processes} | {processes} | {rate:,.0f} | "
                  f"{rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
