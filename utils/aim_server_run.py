"""An Aim run on an `aim server`, held by a process of its own.

Aim's client keeps what the server has not yet taken in a queue, and when its run is closed
or collected (at exit too) it waits for that queue to empty: once the server is gone, for
ever. So a run that logs to a server hands its Aim calls to a child process, which owns the
Aim run. Training never waits for the server, and a child left waiting on a server that went
away is ended rather than waited for.

    aim_run = AimServerRun.open("aim://10.0.0.5:53800", "20261207_120000_base", None, log)
    aim_run.set("hparams", {"learning_rate": 0.003})
    aim_run.track(("scalar", 1.9), "loss", step=10, context={"subset": "train"})
    aim_run.close()            # the child closes the Aim run once the server has every call
    aim_run.abandon()          # or: the server is gone, end the child now

AimServer asks a server whether it answers. The child runs this module (python -m
utils.aim_server_run).
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import re
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

# an `aim server` to log to: aim://HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one
AIM_SERVER_PATTERN = re.compile(r"aim://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
OPEN_SECONDS = 60.0  # for the child to start Python and Aim and open the run
CLOSE_SECONDS = 60.0  # for the server to take what is queued once the run ends
QUEUED_CALLS = 100_000  # past this many calls the server has not taken, later ones are dropped


class AimServer:
    """An `aim server` at aim://HOST:PORT, asked whether it answers through its status page."""

    CHECK_SECONDS = 5.0  # between checks during a run: one costs a loopback request or so
    TIMEOUT_SECONDS = 3.0

    def __init__(self, address: str) -> None:
        match = AIM_SERVER_PATTERN.fullmatch(address)
        assert match is not None, address  # the config checked it
        self.address = address
        self.host, self.port = match["host"], int(match["port"])
        self.checked_at = -math.inf

    def problem(self) -> str | None:
        """None when the server answers; otherwise why not, as the network put it. It may
        serve plain HTTP or HTTPS (with its own certificate), so both count."""
        self.checked_at = time.monotonic()
        reason = "no answer"
        for scheme in ("http", "https"):
            try:
                urllib.request.urlopen(f"{scheme}://{self.host}:{self.port}/status/",
                                       timeout=self.TIMEOUT_SECONDS,
                                       context=any_certificate() if scheme == "https" else None
                                       ).close()
                return None
            except urllib.error.HTTPError:
                return None  # it answered, if not with a page
            except (OSError, ValueError) as error:
                reason = str(getattr(error, "reason", error)) if scheme == "http" else reason
        return reason

    def problem_now_and_then(self) -> str | None:
        """problem(), asked at most every CHECK_SECONDS: None in between."""
        if time.monotonic() - self.checked_at < self.CHECK_SECONDS:
            return None
        return self.problem()


def any_certificate() -> ssl.SSLContext:
    """TLS that takes the server's certificate unchecked: only whether it answers is asked,
    nothing is sent."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class AimServerError(Exception):
    """The child could not open the run on the server; the message says why."""


class AimServerRun:
    def __init__(self, process: subprocess.Popen, run_hash: str) -> None:
        self.process = process
        self.hash = run_hash
        self.calls: queue.Queue[tuple[str, tuple] | None] = queue.Queue(QUEUED_CALLS)
        self.dropped = 0
        # the pipe to the child can fill while the server is slow: a thread of its own waits
        self.sender = threading.Thread(target=self._send, daemon=True, name="aim-server-run")
        self.sender.start()

    @classmethod
    def open(cls, address: str, name: str, saved_hash: str | None,
             log_path: Path) -> AimServerRun:
        """Start the child, which opens a new run named `name` on the server at `address`, or
        takes over the run saved_hash; its own messages go to log_path."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "utils.aim_server_run", address, name, saved_hash or ""],
                cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], OPEN_SECONDS)
        run_hash = process.stdout.readline().decode().strip() if ready else ""
        if not run_hash:
            process.kill()
            process.wait()
            last = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise AimServerError(f"could not open an Aim run on {address}: "
                                 f"{last[0] if last else 'no answer in time'}")
        return cls(process, run_hash)

    def set(self, key: str, value: Any) -> None:
        self._queue("set", (key, value))

    def track(self, value: tuple, name: str, step: int, context: dict[str, str]) -> None:
        """value: ("scalar", x), ("text", text) or ("distribution", bin_counts, (low, high))."""
        self._queue("track", (value, name, step, context))

    def close(self) -> bool:
        """Hand the child every call, let it close the run, and wait for it up to
        CLOSE_SECONDS; False if it had to be ended (the server did not take them in time)."""
        self.calls.put(None)
        self.sender.join(CLOSE_SECONDS)
        try:
            self.process.wait(CLOSE_SECONDS)
            return self.process.returncode == 0
        except subprocess.TimeoutExpired:
            self.abandon()
            return False

    def abandon(self) -> None:
        """End the child without waiting for the server (one that went away)."""
        self.process.kill()
        self.process.wait()

    def _queue(self, kind: str, args: tuple) -> None:
        try:
            self.calls.put_nowait((kind, args))
        except queue.Full:
            self.dropped += 1

    def _send(self) -> None:
        pipe = self.process.stdin
        assert pipe is not None
        try:
            while (call := self.calls.get()) is not None:
                pickle.dump(call, pipe)
                pipe.flush()
            pipe.close()
        except (BrokenPipeError, OSError):
            pass  # the child was ended


# the child ------------------------------------------------------------------------------------

def serve(address: str, name: str, saved_hash: str, calls: BinaryIO) -> None:
    """Open the run, print its hash, apply each call read from `calls` until the training
    process closes them (or is gone), close the run."""
    import aim

    # Ctrl-C in a terminal reaches the whole process group: the training process ends its
    # steps and closes the calls, after which this process closes the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    if saved_hash:
        # the process that held this run is gone (it was stopped or killed): take it over
        run = aim.Run(saved_hash, repo=address, force_resume=True)
    else:
        run = aim.Run(repo=address)
        run.name = name
    print(run.hash, flush=True)
    while True:
        try:
            kind, args = pickle.load(calls)
        except EOFError:
            break
        if kind == "set":
            key, value = args
            run[key] = value
        else:
            value, metric, step, context = args
            run.track(aim_value(aim, value), name=metric, step=step, context=context)
    closing = threading.Thread(target=run.close, daemon=True)
    closing.start()
    closing.join(CLOSE_SECONDS)
    if closing.is_alive():
        # the server took nothing more in time; Aim's exit handlers would wait on it again
        os._exit(1)


def aim_value(aim: Any, value: tuple) -> Any:
    kind, *data = value
    if kind == "text":
        return aim.Text(data[0])
    if kind == "distribution":
        counts, bin_range = data
        return aim.Distribution(hist=counts, bin_range=bin_range)
    return data[0]


if __name__ == "__main__":
    serve(*sys.argv[1:4], calls=sys.stdin.buffer)
