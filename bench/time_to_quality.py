"""Recipes raced at equal wall-clock: each trains with train.py itself under the same
--time-budget, and is judged by its full-split val loss (every non-overlapping window of the
val split). The classic preset (nanoGPT's recipe) always runs in the same bench, so two figures
from one run compare, not two from two days.

Usage: python bench/time_to_quality.py --data-path ../shared/data/tinyshakespeare.txt
           [--time-budget SECONDS] [--recipes default classic] [--seeds 1337 7 42]
           [--ablations] [--markdown]

--ablations adds a row per lever: the lever alone on top of classic, and the default with that
lever set back to classic's value. Runs go one after another: each has the machine to itself.
With several --seeds every recipe runs once per seed, the seeds interleaved (all recipes on the
first seed, then the second...), so a slow spell of a shared machine falls on all of them. Each
row gives the run's milliseconds per step: machines differ, so compare recipes within a race.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.config import TrainConfig  # noqa: E402

CLASSIC = ["--config", str(ROOT / "configs" / "presets" / "classic.yaml")]
RECIPES = {
    "default": [],
    "classic": CLASSIC,
    "gpu": ["--config", str(ROOT / "configs" / "presets" / "gpu.yaml")],
}
# each lever: (flags that turn it on, flags that set it back to classic's value)
LEVERS = {
    "rope": (["--position", "rope"], ["--position", "learned"]),
    "rmsnorm": (["--norm", "rmsnorm"], ["--norm", "layernorm"]),
    "embedding_norm": (["--embedding-norm"], ["--no-embedding-norm"]),
    "qk_norm": (["--qk-norm"], ["--no-qk-norm"]),
    "relu2": (["--mlp", "relu2"], ["--mlp", "gelu"]),
    "untied_head": (["--no-tie-embeddings"], ["--tie-embeddings"]),
    "softcap": (["--logit-softcap", "15"], ["--logit-softcap", "none"]),
    "zero_init": (["--zero-init-projections"], ["--no-zero-init-projections"]),
    "muon": (["--optimizer", "muon", "--normuon-beta2", "none"], ["--optimizer", "adamw"]),
    "normuon": (["--optimizer", "muon", "--normuon-beta2", "0.95"], ["--normuon-beta2", "none"]),
    "wsd": (["--schedule", "wsd", "--min-lr", "0"], ["--schedule", "cosine", "--min-lr", "3e-4"]),
    "adamw_3e-3_0.8_0.95_no_wd": (
        ["--learning-rate", "3e-3", "--min-lr", "3e-4", "--beta1", "0.8", "--beta2", "0.95",
         "--weight-decay", "0"],
        ["--learning-rate", "1e-3", "--min-lr", "0", "--beta1", "0.9", "--beta2", "0.99",
         "--weight-decay", "0.1"]),
    "embedding_lr": (["--embedding-lr", "0.3"], ["--embedding-lr", "none"]),
    "batch_32x128": (["--batch-size", "32", "--block-size", "128"],
                     ["--batch-size", "12", "--block-size", "64"]),
    "epochs": (["--sampling", "epochs"], ["--sampling", "random"]),
}
FULL_LOSS = re.compile(r"full-split val loss (\d+\.\d+)")


def run_recipe(name: str, flags: list[str], args: argparse.Namespace, runs_dir: Path,
               seed: int | None) -> dict:
    seed_flags = [] if seed is None else ["--seed", str(seed)]
    command = [sys.executable, str(ROOT / "train.py"), *flags, *seed_flags, "--data-path",
               args.data_path, "--time-budget", str(args.time_budget), "--runs-dir",
               str(runs_dir), "--run-tag", re.sub(r"[^A-Za-z0-9._-]", "_", name),
               "--checkpoint-interval", "none"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    match = FULL_LOSS.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"{name} failed ({result.returncode}): {result.stderr[-2000:]}")
    run_dir = max(runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    saved = json.loads((run_dir / "meta" / "full_config.json").read_text())
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    # the calibration's line, and the pace check's where the run had one
    calibration = re.findall(r"time budget .*|pace check .*", result.stderr)
    return {"recipe": name, "seed": saved["train"]["seed"],
            "full_val_loss": float(match.group(1)), "wall_s": wall,
            "steps": results["steps"], "ms_per_step": 1e3 * results["training_seconds"]
            / max(1, results["steps"]), "flags": " ".join(flags),
            "calibration": "\n    ".join(calibration)}


def recipes_to_run(args: argparse.Namespace) -> dict[str, list[str]]:
    chosen = {name: RECIPES[name] for name in args.recipes}
    chosen.setdefault("classic", CLASSIC)  # the anchor is always in the same bench
    for extra in args.extra:
        name, _, flags = extra.partition("=")
        chosen[name] = flags.split()
    if args.ablations:
        for lever, (on, off) in LEVERS.items():
            chosen[f"classic + {lever}"] = CLASSIC + on
            chosen[f"default - {lever}"] = off
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=str(ROOT / "input.txt"))
    parser.add_argument("--time-budget", default=f"{TrainConfig().time_budget:g}",
                        help="seconds each recipe trains for (default: the default run's)")
    parser.add_argument("--recipes", nargs="+", default=["default", "classic"],
                        choices=sorted(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[None],
                        help="run every recipe once per seed (default: the config's seed)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md table")
    parser.add_argument("--verbose", action="store_true",
                        help="show each run's calibration and pace check")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=FLAGS",
                        help="more recipes, e.g. 'fast=--muon-lr 0.04' (flags over the default)")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{Path(args.data_path).name}, time budget {args.time_budget}s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in args.seeds:
            for name, flags in recipes_to_run(args).items():
                row = run_recipe(name, flags, args, Path(runs_dir), seed)
                rows.append(row)
                print(f"{name:40s} seed {row['seed']:<5d} full-split val "
                      f"{row['full_val_loss']:.4f}  {row['steps']:5d} steps  "
                      f"{row['ms_per_step']:6.1f} ms/step  {row['wall_s']:6.1f}s", flush=True)
                if args.verbose:
                    print(f"    {row['calibration']}", flush=True)
    if args.markdown:
        print_markdown(rows)


def print_markdown(rows: list[dict]) -> None:
    """One row per run, then each recipe's mean over the seeds and its margin under classic's
    mean."""
    print("\n| recipe | seed | full-split val loss | steps | ms per step | wall-clock (s) |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['seed']} | {row['full_val_loss']:.4f} | "
              f"{row['steps']:,} | {row['ms_per_step']:.0f} | {row['wall_s']:.0f} |")
    by_recipe: dict[str, list[float]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row["full_val_loss"])
    if len(next(iter(by_recipe.values()))) > 1:
        classic = statistics.mean(by_recipe["classic"])
        print("\n| recipe | mean full-split val loss | spread (max - min) | under classic |\n"
              "|---|---|---|---|")
        for name, losses in by_recipe.items():
            mean = statistics.mean(losses)
            print(f"| {name} | {mean:.4f} | {max(losses) - min(losses):.4f} | "
                  f"{classic - mean:.4f} |")

if __name__ == "__main__":
    main()
