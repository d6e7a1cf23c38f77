"""Wall-clock for the GPU preset to reach a val loss target, measured on the whole val split.

train.py's own setup and training step with the preset's config; every --check-interval steps
the loss over every non-overlapping block_size window of the validation split (not a sample of
random batches) is computed, and the training time (evaluation excluded) at the first check at
or below the target is reported.

Usage: python bench/time_to_quality.py --data-path ../shared/data/tinyshakespeare.txt
       [--target 1.47] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from utils.device import synchronize  # noqa: E402
from utils.setup import Setup, setup_from_flags  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "presets" / "gpu.yaml"


@torch.no_grad()
def full_split_loss(model, setup: Setup, batch_size: int = 128) -> float:
    """Mean next-character loss over all non-overlapping windows of the val split."""
    data, block_size = setup.splits.val, setup.config.model.block_size
    model.eval()
    n_windows = (len(data) - 1) // block_size
    starts = torch.arange(n_windows) * block_size
    offsets = torch.arange(block_size + 1)
    total, count = 0.0, 0
    for batch_starts in starts.split(batch_size):
        windows = data[batch_starts[:, None] + offsets].to(setup.device)
        with setup.autocast():
            _, loss = model(windows[:, :-1], windows[:, 1:])
        total += loss.item() * len(batch_starts)
        count += len(batch_starts)
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--check-interval", type=int, default=250)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    flags = ["--config", str(PRESET), "--data-path", args.data_path]
    flags += ["--compile"] if args.compile else []
    setup = setup_from_flags(flags)
    state = train.init_state(setup)
    cfg, device = setup.config.train, setup.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    print(f"# {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, dtype "
          f"{setup.dtype_name}, compile {cfg.compile}; val split {len(setup.splits.val):,} "
          f"characters, target {args.target}")
    print("| step | training s | full val loss |\n|---|---|---|")
    trained_s = 0.0
    while state.step < cfg.max_iters:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.check_interval):
            train.optimizer_step(state, setup)
            state.scheduler.step()
            state.step += 1
        synchronize(device)
        trained_s += time.perf_counter() - start
        val = full_split_loss(state.step_model, setup)
        print(f"| {state.step} | {trained_s:.1f} | {val:.4f} |", flush=True)
        if val <= args.target:
            print(f"reached val loss {val:.4f} <= {args.target} at step {state.step} after "
                  f"{trained_s:.1f} s of training")
            return
    print(f"did not reach {args.target} in {cfg.max_iters} steps ({trained_s:.1f} s)")


if __name__ == "__main__":
    main()
