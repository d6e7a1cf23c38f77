"""serve.py under load: characters per second streamed to one client alone, then to N clients
streaming at once (each its own seed), per client and in total. Every client reads the whole
stream over loopback HTTP, as the page does.

Usage: python bench/serve_load.py --run runs/<id> [--clients 8] [--chars 500]
           [--serve-flags "--num-threads 1"] [--serve-flags "--num-threads 2"]
Each --serve-flags starts its own server: the rows compare its settings. Prints a table;
BENCHMARKS.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def stream(url: str, body: dict) -> tuple[int, float]:
    """Characters streamed and the seconds from the request to the last line."""
    request = urllib.request.Request(f"{url}/api/generate", json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    chars = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            chars += json.loads(line)["type"] == "char"
    return chars, time.perf_counter() - start


def clients_at_once(url: str, bodies: list[dict]) -> tuple[list[float], float]:
    """Each client's characters/s, and all characters over the wall-clock of all."""
    results: list[tuple[int, float] | None] = [None] * len(bodies)

    def client(index: int) -> None:
        results[index] = stream(url, bodies[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    if len(done) < len(bodies):
        raise SystemExit(f"{len(bodies) - len(done)} of {len(bodies)} clients failed")
    return [chars / seconds for chars, seconds in done], sum(c for c, _ in done) / wall


def measure(run: Path, serve_flags: list[str], clients: int, chars: int) -> dict:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--runs-dir", str(run.parent), "--run",
         run.name, "--port", "0", *serve_flags], stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        printed = server.stdout.readline()  # printed once it listens, with the port it took
        port = re.search(r"http://\S+:(\d+)/", printed)
        if port is None:
            raise SystemExit(f"serve.py did not start: {printed}")
        url = f"http://127.0.0.1:{port.group(1)}"
        body = {"run": run.name, "prompt": "\n", "max_new_tokens": chars, "temperature": 1.0}
        stream(url, {**body, "seed": 0})  # warm-up
        alone_chars, alone_seconds = stream(url, {**body, "seed": 1})
        per_client, total = clients_at_once(url, [{**body, "seed": 100 + i}
                                                  for i in range(clients)])
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    return {"alone": alone_chars / alone_seconds, "per_client_min": min(per_client),
            "per_client_median": sorted(per_client)[len(per_client) // 2], "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder runs/<id>")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--chars", type=int, default=500, help="characters each client asks for")
    parser.add_argument("--serve-flags", action="append", default=[],
                        help="serve.py flags of one server (repeatable: one row each)")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, run {args.run.name}, {args.clients} clients x "
          f"{args.chars} characters")
    print("| serve.py flags | one client alone (chars/s) | each of N at once, median (min) | "
          "all N together |\n|---|---|---|---|")
    for flags in args.serve_flags or [""]:
        row = measure(args.run, shlex.split(flags), args.clients, args.chars)
        print(f"| {flags or '(defaults)'} | {row['alone']:,.0f} | "
              f"{row['per_client_median']:,.0f} ({row['per_client_min']:,.0f}) | "
              f"{row['total']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
