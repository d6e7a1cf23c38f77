"""How the token store scales: tokenising speed, training memory and time to the first step
on corpora of 10 MB, 100 MB and 1 GB, against the same on input.txt.

The corpora are input.txt repeated, written to a temporary folder and deleted afterwards.
For each: a cold `python train.py --describe-data` (the store is built; MB/s of text, timed
inside the build), then train.py on the cached store for a few steps (peak RSS of the process,
and seconds from launch to the line that starts training). Prints one table; BENCHMARKS.md
keeps it.
Usage: python bench/data_scale.py [--sizes-mb 10 100 1000] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUT = ROOT / "input.txt"


def make_corpus(path: Path, size_mb: int) -> None:
    """input.txt repeated to about size_mb megabytes."""
    text = INPUT.read_bytes()
    target = size_mb * 1_000_000
    with open(path, "wb") as handle:
        written = 0
        while written < target:
            handle.write(text)
            written += len(text)


def run_measured(command: list[str], env: dict[str, str],
                 start_marker: str | None = None) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS in MB, seconds until a line containing start_marker)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    marker_at = None
    output = []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if marker_at is None and start_marker and start_marker in line:
            marker_at = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{''.join(output)[-2000:]}")
    return wall, usage.ru_maxrss / 1024, marker_at  # ru_maxrss is in KiB on Linux


def measure(data_path: Path, cache: Path, steps: int) -> dict[str, float]:
    env = {**os.environ, "CHARGPT_TOKEN_CACHE": str(cache)}
    report = subprocess.run([sys.executable, "train.py", "--describe-data", "--data-path",
                             str(data_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=True).stdout
    store = Path(re.search(r"store: +(\S+) \(built now", report).group(1))
    build_s = json.loads((store / "meta.json").read_text())["build_seconds"]
    train_command = [sys.executable, "train.py", "--data-path", str(data_path), "--max-iters",
                     str(steps), "--eval-interval", str(steps), "--sample-tokens", "0",
                     "--checkpoint-interval", "none", "--no-aim", "--runs-dir",
                     str(cache.parent / "runs")]
    _, rss_mb, first_step_s = run_measured(train_command, env, start_marker=" at step 0: ")
    return {"build_s": build_s, "rss_mb": rss_mb, "first_step_s": first_step_s or float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    print("| corpus | size (MB) | cold build (s) | tokenising (MB/s) | peak RSS training (MB) "
          "| launch to first step (s) |\n|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        corpora = [("input.txt", INPUT)]
        for size in args.sizes_mb:
            corpora.append((f"{size} MB", work / f"corpus_{size}mb.txt"))
        for name, path in corpora:
            if not path.exists():
                make_corpus(path, int(name.split()[0]))
            size_mb = path.stat().st_size / 1e6
            row = measure(path, work / "cache", args.steps)
            print(f"| {name} | {size_mb:,.0f} | {row['build_s']:.1f} | "
                  f"{size_mb / row['build_s']:,.0f} | {row['rss_mb']:,.0f} | "
                  f"{row['first_step_s']:.1f} |", flush=True)
            if path != INPUT:
                path.unlink()


if __name__ == "__main__":
    main()
