"""Aim on an `aim server` (--aim-repo aim://HOST:PORT), the server started by the test on a
free loopback port: the run lands in the server's repo and a resume continues it there; a
server that goes away mid-run never stops training; a bad address or no server is refused
before any run folder exists."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import train
from tests.conftest import BIN, find_aim_run, free_port
from tests.test_tracking import TINY, steps_and_values


@contextlib.contextmanager
def running_aim_server(folder: Path) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """A running `aim server` on loopback: (its aim:// address, its repo folder, its process)."""
    import aim

    repo = folder / "server_repo"
    repo.mkdir()
    aim.Repo.from_path(str(repo), init=True).close()  # `aim init`, without starting Python
    port = free_port()
    # its own process group: the server answers through a uvicorn child, which must go too
    server = subprocess.Popen([str(BIN / "aim"), "server", "--repo", str(repo), "--host",
                               "127.0.0.1", "--port", str(port)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(port, server)
        yield f"aim://127.0.0.1:{port}", repo, server
    finally:
        stop(server, signal.SIGKILL)  # its repo is the test's to throw away


@pytest.fixture
def aim_server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """A server of the test's own, which it may stop."""
    with running_aim_server(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def shared_aim_server(tmp_path_factory) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """One server for the tests that leave it running: starting one takes seconds."""
    with running_aim_server(tmp_path_factory.mktemp("aim_server")) as server:
        yield server


def wait_until_answering(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status/", timeout=2).close()
            return
        except OSError:
            assert server.poll() is None, f"aim server exited with {server.returncode}"
            assert time.monotonic() < deadline, "aim server did not answer"
            time.sleep(0.1)


def stop(server: subprocess.Popen, how: signal.Signals) -> None:
    """Stop the server and its uvicorn child (its process group), and wait until both are gone."""
    try:
        os.killpg(server.pid, how)
    except ProcessLookupError:
        return  # already stopped, children and all
    server.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_alive(server.pid):
        assert time.monotonic() < deadline, "the aim server's children did not stop"
        time.sleep(0.05)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def aim_children() -> list[psutil.Process]:
    """This process's children that hold an Aim run on a server."""
    return [child for child in psutil.Process().children()
            if "utils.aim_server_run" in child.cmdline()]


def results(runs: Path) -> dict:
    (run_dir,) = runs.iterdir()
    return json.loads((run_dir / "meta" / "results.json").read_text())


def test_a_run_logs_to_the_server_and_a_resume_continues_its_aim_run(aim_server, tmp_path,
                                                                      capsys):
    from aim.storage.context import Context

    address, repo, server = aim_server
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--checkpoint-interval", "20", "--aim", "--aim-repo", address,
                       "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    assert train.main(["--resume", str(run_dir), "--max-iters", "60"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert results(runs)["trackers_lost"] == {}
    assert aim_children() == []
    assert (run_dir / "meta" / "aim_run.txt").read_text().split("\n")[1] == address
    stop(server, signal.SIGINT)  # the repo is read from its folder, as after the server's day

    run = find_aim_run(repo, run_dir.name)
    steps, _ = steps_and_values(run.get_metric("loss", Context({"subset": "train"})))
    val_steps, val_values = steps_and_values(run.get_metric("loss", Context({"subset": "val"})))
    assert (steps, val_steps) == ([10, 20, 30, 40, 50, 60], [20, 40, 60])
    assert run["hparams"]["max_iters"] == 60 and run["hparams"]["aim_repo"] == address
    assert run["results"]["hparams/final_val_loss"] == pytest.approx(val_values[-1])
    assert run.get_text_sequence("samples", Context({})) is not None
    assert not run.active


def test_a_server_that_goes_away_mid_run_never_stops_training(aim_server, tmp_path, capsys,
                                                               monkeypatch):
    """The server is killed (with its children) during step 25; the run trains to the end with
    the loss of a run without Aim, says so once, and records it in results.json."""
    address, _, server = aim_server
    flags = [*TINY, "--num-threads", "1"]
    assert train.main([*flags, "--runs-dir", str(tmp_path / "alone")]) == 0
    real_step = train.optimizer_step
    calls = {"n": 0}

    def step_then_kill_the_server(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            stop(server, signal.SIGKILL)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", step_then_kill_the_server)
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert train.main([*flags, "--aim", "--aim-repo", address, "--runs-dir", str(runs)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "Traceback" not in err
    assert re.match(rf"warning: the Aim server at {re.escape(address)} stopped answering "
                    r"\(.+\), (by|at the end of) step \d+; ", warnings[0]), warnings[0]
    assert "the run goes on without Aim (TensorBoard has every step)" in warnings[0]
    tracked, alone = results(runs), results(tmp_path / "alone")
    assert tracked["trackers_lost"]["aim"] == warnings[0].removeprefix("warning: ").split(";")[0]
    for key in ("steps", "final_val_loss", "full_split_val_loss", "end_reason"):
        assert tracked[key] == alone[key], key
    assert aim_children() == []


def test_an_aim_client_that_ends_mid_run_is_said_once_and_training_goes_on(
        shared_aim_server, tmp_path, capsys, monkeypatch):
    address, _, _ = shared_aim_server
    real_step = train.optimizer_step
    calls = {"n": 0}

    def step_then_kill_the_client(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            (child,) = aim_children()
            child.kill()  # not waited for here: the run's own wait must see how it ended
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", step_then_kill_the_client)
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--aim", "--aim-repo", address, "--runs-dir", str(runs)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 1
    lost = results(runs)["trackers_lost"]["aim"]
    assert lost.startswith(f"Aim's client for {address} ended with exit code -9 (its messages "
                           "are in ") and lost in warnings[0]
    assert results(runs)["steps"] == 40


def test_an_aim_run_that_cannot_be_opened_is_said_once_and_training_goes_on(
        shared_aim_server, tmp_path, capsys):
    """A resume whose Aim run is not on the server (its repo was replaced, say)."""
    address, _, _ = shared_aim_server
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--checkpoint-interval", "20", "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    (run_dir / "meta" / "aim_run.txt").write_text(f"{'0' * 24}\n{address}\n")
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--max-iters", "60", "--aim", "--aim-repo",
                       address]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 1
    lost = results(runs)["trackers_lost"]["aim"]
    assert lost.startswith(f"could not open an Aim run on {address}: ") and lost in warnings[0]
    assert results(runs)["steps"] == 60 and aim_children() == []


BAD_ADDRESSES = ["aim://127.0.0.1", "aim://127.0.0.1:70000", "aim://127.0.0.1:0",
                 "aim://:53800", "aim://127.0.0.1:53800/repo", "http://127.0.0.1:43800"]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_malformed_server_address_is_refused_in_one_line(tmp_path, capsys, address):
    runs = tmp_path / "runs"
    assert train.main([*TINY, "--aim", "--aim-repo", address, "--runs-dir", str(runs)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: aim_repo takes a folder or an Aim server's address, "
                           "aim://HOST:PORT") and address in line
    assert not runs.exists()


class NotAimServer(http.server.BaseHTTPRequestHandler):
    """A web server that answers every page, as Aim's UI does on its own port."""

    def do_GET(self) -> None:  # noqa: N802 (the handler's name is http.server's)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>a web page</html>")

    def log_message(self, *args) -> None:
        pass


def test_a_web_server_that_is_not_aim_is_refused_in_one_line(tmp_path, capsys):
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAimServer) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        address = f"aim://127.0.0.1:{web.server_address[1]}"
        runs = tmp_path / "runs"
        code = train.main([*TINY, "--aim", "--aim-repo", address, "--runs-dir", str(runs)])
        web.shutdown()
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: no Aim server answers at {address} (it answers, but not "
                           "as an `aim server`")
    assert not runs.exists()


def test_no_server_at_the_address_is_refused_in_one_line(tmp_path, capsys):
    runs, port = tmp_path / "runs", free_port()
    assert train.main([*TINY, "--aim", "--aim-repo", f"aim://127.0.0.1:{port}", "--runs-dir",
                       str(runs)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: no Aim server answers at aim://127.0.0.1:{port} (")
    assert f"aim server --repo FOLDER --host 0.0.0.0 --port {port}" in line
    assert not runs.exists()
