"""An Aim run on an `aim server`, held by a process of its own.

Aim's client keeps what the server has not yet taken in a queue, and when its run is closed
or collected (at exit too) it waits for that queue to empty: once the server is gone, for
ever. So a run that logs to a server hands its Aim calls to a child process, which owns the
Aim run. Training never waits for the server or the network: the calls go through a queue, a
thread of this process asks the server whether it still answers, and a child left waiting on
a server that went away is ended rather than waited for.

    aim_run = AimServerRun.open(AimServer(address), "20261207_120000_base", None, log)
    aim_run.set("hparams", {"learning_rate": 0.003})
    aim_run.track(("scalar", 1.9), "loss", step=10, context={"subset": "train"})
    aim_run.trouble()          # None, or why nothing more should go to it
    aim_run.close()            # None once the child closed the Aim run, or why not

The child runs this module (python -m utils.aim_server_run).
"""

from __future__ import annotations

import contextlib
import http.client
import json
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
import traceback
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

# an `aim server` to log to: aim://HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one
AIM_SERVER_PATTERN = re.compile(r"aim://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
OPEN_SECONDS = 60.0  # for the child to start Python and Aim and open the run
CLOSE_SECONDS = 30.0  # for the server to take what is queued once the run ends
QUEUED_CALLS = 100_000  # past this many calls the server has not taken, later ones are dropped
CHECK_SECONDS = 5.0  # between two questions to the server during a run
CHECKS_TO_GIVE_UP = 2  # unanswered questions in a row: one slow answer is not a lost server


class AimServer:
    """An `aim server` at aim://HOST:PORT, asked whether it answers as one: its status page
    says {"status": "OK"} (Aim's UI, any other web server or a proxy's error page do not)."""

    TIMEOUT_SECONDS = 3.0

    def __init__(self, address: str) -> None:
        match = AIM_SERVER_PATTERN.fullmatch(address)
        assert match is not None, address  # the config checked it
        self.address = address
        self.host, self.port = match["host"], int(match["port"])

    def problem(self) -> str | None:
        """None when the server answers; otherwise why not. It may serve plain HTTP or HTTPS
        (with its own certificate), so both are asked."""
        reasons = []
        for scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(f"{scheme}://{self.host}:{self.port}/status/",
                                            timeout=self.TIMEOUT_SECONDS,
                                            context=any_certificate() if scheme == "https"
                                            else None) as response:
                    body = response.read(1000)
            except (OSError, ValueError, http.client.HTTPException) as error:
                reasons.append(str(getattr(error, "reason", error)) or type(error).__name__)
                continue
            if is_aim_status(body):
                return None
            reasons.append("it answers, but not as an `aim server`; Aim's UI has a port of its "
                           "own")
        return min(reasons, key=lambda reason: not reason.startswith("it answers"))


def is_aim_status(body: bytes) -> bool:
    try:
        status = json.loads(body)
    except ValueError:
        return False
    return isinstance(status, dict) and status.get("status") == "OK"


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
    def __init__(self, server: AimServer, process: subprocess.Popen, run_hash: str,
                 log_path: Path) -> None:
        self.server, self.process, self.hash, self.log_path = server, process, run_hash, log_path
        self.calls: queue.Queue[tuple[str, tuple] | None] = queue.Queue(QUEUED_CALLS)
        self.dropped = 0
        self.server_problem: str | None = None
        self.stopped = threading.Event()
        # the pipe to the child can fill while the server is slow: a thread of its own waits
        threading.Thread(target=self._send, daemon=True, name="aim-calls").start()
        threading.Thread(target=self._watch, daemon=True, name="aim-server-check").start()

    @classmethod
    def open(cls, server: AimServer, name: str, saved_hash: str | None,
             log_path: Path) -> AimServerRun:
        """Start the child, which opens a new run named `name` on the server, or takes over
        the run saved_hash; its own messages go to log_path."""
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "utils.aim_server_run", server.address, name,
                 saved_hash or ""],
                cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert process.stdout is not None
        try:
            ready, _, _ = select.select([process.stdout], [], [], OPEN_SECONDS)
            run_hash = process.stdout.readline().decode().strip() if ready else ""
        except BaseException:
            end(process)
            raise
        process.stdout.close()
        if not run_hash:
            end(process)
            with open(log_path, "rb") as log:
                log.seek(log_start)
                said = log.read().decode(errors="replace").strip().splitlines()
            why = said[-1] if said else f"no answer in {OPEN_SECONDS:.0f} s"
            raise AimServerError(f"could not open an Aim run on {server.address}: {why}")
        return cls(server, process, run_hash, log_path)

    def set(self, key: str, value: Any) -> None:
        self._queue("set", (key, value))

    def track(self, value: tuple, name: str, step: int, context: dict[str, str]) -> None:
        """value: ("scalar", x), ("text", text) or ("distribution", bin_counts, (low, high))."""
        self._queue("track", (value, name, step, context))

    def trouble(self) -> str | None:
        """Why nothing more should go to this run (the server stopped answering, the child
        ended), or None. Asks nothing over the network: a thread of its own does."""
        if self.server_problem is not None:
            return (f"the Aim server at {self.server.address} stopped answering "
                    f"({self.server_problem})")
        if self.process.poll() is not None:
            return (f"Aim's client for {self.server.address} ended with exit code "
                    f"{self.process.returncode} (its messages are in {self.log_path})")
        return None

    def close(self) -> str | None:
        """Hand the child every call and let it close the run: one question to the server (a
        server gone at the run's end is not waited for), then CLOSE_SECONDS in all for the
        rest; None once it has, else why not (the child is ended then)."""
        self.stopped.set()
        if self.server_problem is None and self.process.poll() is None:
            self.server_problem = self.server.problem()
        trouble = self.trouble()
        if trouble is None:
            deadline = time.monotonic() + CLOSE_SECONDS
            self._queue_end(wait_seconds=CLOSE_SECONDS)
            try:
                self.process.wait(max(0.0, deadline - time.monotonic()))
                if self.process.returncode != 0:
                    trouble = self.trouble()
            except subprocess.TimeoutExpired:
                trouble = (f"the Aim server at {self.server.address} had not taken the run's "
                           f"last logs {CLOSE_SECONDS:.0f} s after its end")
        self.abandon()
        if trouble is None and self.dropped:
            trouble = (f"the Aim server at {self.server.address} took the run's logs slower "
                       f"than it made them: {self.dropped} calls were dropped")
        return trouble

    def abandon(self) -> None:
        """End the child now, without waiting for the server (one that went away)."""
        self.stopped.set()
        end(self.process)
        self._queue_end()

    def _queue(self, kind: str, args: tuple) -> None:
        try:
            self.calls.put_nowait((kind, args))
        except queue.Full:
            self.dropped += 1

    def _queue_end(self, wait_seconds: float = 0.0) -> None:
        try:
            self.calls.put(None, block=wait_seconds > 0, timeout=wait_seconds or None)
        except queue.Full:
            end(self.process)  # the sender is stuck on a full pipe: ending the child frees it

    def _send(self) -> None:
        pipe = self.process.stdin
        assert pipe is not None
        # an OSError here means the child was ended: nothing more can reach it
        with contextlib.suppress(OSError):
            while (call := self.calls.get()) is not None:
                pickle.dump(call, pipe)
                pipe.flush()
        with contextlib.suppress(OSError):
            pipe.close()

    def _watch(self) -> None:
        unanswered = 0
        while not self.stopped.wait(CHECK_SECONDS):
            problem = self.server.problem()
            unanswered = 0 if problem is None else unanswered + 1
            if unanswered >= CHECKS_TO_GIVE_UP:
                self.server_problem = problem
                return


def end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


# the child ------------------------------------------------------------------------------------

def serve(address: str, name: str, saved_hash: str, calls: BinaryIO) -> None:
    """Open the run, print its hash, apply each call read from `calls` until the training
    process closes them, close the run."""
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group: the
    # training process ends its steps and closes the calls, after which this process closes
    # the run; the training process kills it if it must
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(os.getppid())
    import aim

    # the process's own use of the machine and its console would be this child's, not the
    # training's: TensorBoard and the run folder have those
    options = {"system_tracking_interval": None, "capture_terminal_logs": False}
    if saved_hash:
        # the process that held this run is gone (it was stopped or killed): take it over
        run = aim.Run(saved_hash, repo=address, force_resume=True, **options)
    else:
        run = aim.Run(repo=address, **options)
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
        os._exit(1)  # the server took nothing more in time; Aim's exit handlers would wait too


def watch_parent(parent: int) -> None:
    """Once the training process is gone (killed before it could end this one), give the run
    CLOSE_SECONDS to close, then exit whatever Aim is waiting for."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        time.sleep(CLOSE_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def aim_value(aim: Any, value: tuple) -> Any:
    kind, *data = value
    if kind == "text":
        return aim.Text(data[0])
    if kind == "distribution":
        counts, bin_range = data
        return aim.Distribution(hist=counts, bin_range=bin_range)
    return data[0]


if __name__ == "__main__":
    try:
        serve(*sys.argv[1:4], calls=sys.stdin.buffer)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # Aim's exit handlers would wait for a server that may be gone
