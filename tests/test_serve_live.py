"""serve.py as a user runs it: a real server on loopback with several clients, a client that
goes away, Ctrl-C, the command line's own refusals, and the page in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import serve
from tests.conftest import PROJECT_ROOT
from tests.serving_runs import (
    TRAINED,
    cli_text,
    generate,
    generated_text,
)
from utils.errors import UserError

# the runs folder (served_runs) and the app over it (api_client) are tests/conftest.py's, built once
# for this file
pytestmark = pytest.mark.usefixtures("inference_decodes_with_f_linear")


# --- a real server: several clients, a client that goes away, the command line ----------------

def start_server(served_runs: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """serve.py on any free loopback port, and its base URL once it has printed it (it
    listens from then on)."""
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "serve.py"), "--runs-dir", str(served_runs), "--port",
         "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    line = process.stdout.readline()
    match = re.search(r"http://\S+:(\d+)/", line)
    if match is None:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(line + process.communicate(timeout=30)[1])
    return process, f"http://127.0.0.1:{match.group(1)}"


@contextlib.contextmanager
def running_server(served_runs: Path, *flags: str) -> Iterator[str]:
    process, url = start_server(served_runs, *flags)
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_url(served_runs: Path) -> Iterator[str]:
    """One server for the tests that leave it running (starting one takes seconds): the
    trained run named by its folder, as inference.py takes it, room for a generation that
    only its client's going away ends, and a short limit on what one request may score."""
    with running_server(served_runs, "--run", str(served_runs / TRAINED),
                        "--max-new-tokens", "100000", "--max-score-chars", "500") as url:
        yield url


def post_stream(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return [json.loads(line) for line in response]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_eight_clients_stream_at_once_each_with_its_own_seeds_text(api_client, server_url):
    bodies = [{"run": TRAINED, "prompt": "To", "max_new_tokens": 200, "temperature": 1.0,
               "seed": seed} for seed in range(8)]
    alone = [generated_text(generate(api_client, **{k: v for k, v in body.items() if k != "run"}))
             for body in bodies]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, generated_text(post_stream(f"{server_url}/api/generate", bodies[i]))))
        for i in range(8)]
    for thread in threads:
        thread.start()
    # while they stream, the page and the API answer, and the streams run side by side
    most_at_once = 0
    while any(thread.is_alive() for thread in threads):
        most_at_once = max(most_at_once, get_json(f"{server_url}/health")["active_generations"])
        with urllib.request.urlopen(f"{server_url}/", timeout=30) as page:
            assert page.status == 200
        # asked now and then, not in a loop that takes a core
        next((t for t in threads if t.is_alive()), threads[-1]).join(0.05)
    for thread in threads:
        thread.join()
    assert [results.get(i) for i in range(8)] == alone
    assert len(set(alone)) == 8
    assert most_at_once >= 2


def test_a_client_that_goes_away_ends_its_generation(server_url):
    wait_until_idle(server_url)  # the shared server: an earlier test's streams have ended
    body = {"run": TRAINED, "max_new_tokens": 100000, "temperature": 1.0}
    request = urllib.request.Request(f"{server_url}/api/generate", json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()
    response.readline()  # a character has been sent: the generation is under way
    assert get_json(f"{server_url}/health")["active_generations"] == 1
    response.close()  # what the page's Stop does: the connection goes
    wait_until_idle(server_url)


def wait_until_idle(url: str, timeout: float = 60) -> None:
    """Until GET /health counts no generation (nothing outside the server says when one
    ends, so it is asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while get_json(f"{url}/health")["active_generations"]:
        assert time.monotonic() < deadline, "a generation went on without its client"
        time.sleep(0.05)


def refusal(capsys, *argv: str) -> str:
    """serve.py's one error line for argv, after checking it exits 2 without a traceback."""
    code = serve.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert err.rstrip().endswith(line)
    return line


def test_the_command_line_refuses_what_it_cannot_serve(served_runs, tmp_path, capsys):
    assert "does not exist" in refusal(capsys, "--runs-dir", str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    assert "no runs in" in refusal(capsys, "--runs-dir", str(tmp_path / "empty"))
    assert "no run 'nope'" in refusal(capsys, "--runs-dir", str(served_runs), "--run", "nope")
    assert "--port must be in" in refusal(capsys, "--runs-dir", str(served_runs), "--port",
                                          "70000")
    assert "--max-loaded must be at least 1" in refusal(capsys, "--runs-dir", str(served_runs),
                                                        "--max-loaded", "0")
    assert "--num-threads must be in [1, " in refusal(capsys, "--runs-dir", str(served_runs),
                                                      "--num-threads", "999")
    assert "is not an address" in refusal(capsys, "--runs-dir", str(served_runs), "--host",
                                          "no.such.host.invalid")
    with socket_in_use() as port:
        line = refusal(capsys, "--runs-dir", str(served_runs), "--port", str(port))
        assert f"port {port} is in use" in line
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):  # another process's already: in use all the same
            held.enter_context(socket_in_use(65535))
        with pytest.raises(UserError, match=r"port 65535 is in use; pass another with --port, "
                                            r"e\.g\. --port 0 \(any free port\)"):
            serve.open_socket("127.0.0.1", 65535)


@contextlib.contextmanager
def socket_in_use(port: int = 0) -> Iterator[int]:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_run_folder_path_is_taken_like_inference_py_takes_it(server_url):
    assert get_json(f"{server_url}/api/runs")["default"] == TRAINED


def test_the_command_lines_limits_hold_for_every_request(server_url):
    for path, body in (("/api/score", {"run": TRAINED, "text": "To be " * 84}),
                       ("/api/generate", {"run": TRAINED, "prompt": "To be " * 84})):
        request = urllib.request.Request(f"{server_url}{path}", json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert "at most 500" in json.loads(refused.value.read())["error"]


def test_ctrl_c_stops_the_server_while_a_client_streams(served_runs):
    process, url = start_server(served_runs, "--max-new-tokens", "100000")
    request = urllib.request.Request(
        f"{url}/api/generate", json.dumps({"run": TRAINED, "max_new_tokens": 100000}).encode(),
        method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()
        response.readline()  # streaming
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)  # the stream is cut after a grace period
    assert process.returncode == 0 and "Traceback" not in err
    assert err.strip().endswith("stopped")


def test_beyond_loopback_it_warns_and_ctrl_c_twice_ends_it_at_once_without_a_traceback(
        served_runs):
    process, url = start_server(served_runs, "--host", "0.0.0.0")  # loopback included
    get_json(f"{url}/health")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err, err
    assert "anyone who can reach this machine can use the page" in err


# --- the page in a real browser --------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# chromium's own network reaches nothing here: only the page's server is asked
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("REQUIRE_CHROMIUM is set but there is no chromium on PATH")
        pytest.skip("no chromium on PATH: install Debian's chromium package (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def opened_page(browser, url: str):
    """The page, once it has listed both runs of the runs folder."""
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#run-b option').length === 2")
    return page


def run_on_page(page, fields: dict[str, str]) -> None:
    """Fill in the fields, press the main button and wait for the page to say it is done."""
    for selector, value in fields.items():
        page.fill(selector, value)
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")


def test_the_page_generates_the_clis_text_and_shows_each_characters_candidates(
        browser, served_runs, server_url, capsys):
    code, out, _ = cli_text(served_runs, capsys, "--run", str(served_runs / TRAINED), "--prompt",
                            "HAMLET.", "--max-new-tokens", "80", "--temperature", "0")
    assert code == 0
    page = opened_page(browser, server_url)
    page.select_option("#run", TRAINED)
    page.select_option("#checkpoint", "export")
    run_on_page(page, {"#prompt": "HAMLET.", "#temperature": "0", "#max_new_tokens": "80"})
    assert page.text_content("#output-a") == out.removesuffix("\n")
    assert page.locator("#output-a span.c").count() == 80
    page.hover("#output-a span.c >> nth=3")
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible()
    assert "the model" in tooltip.text_content()
    assert tooltip.locator("table").first.locator("tr").count() == 10

    # a stop string typed as \n is a newline: the text ends where the first one would start
    assert "\n" in out.removesuffix("\n")
    page.fill("#stop", "\\n")
    run_on_page(page, {})
    assert page.text_content("#output-a") == out.split("\n")[0]
    assert "ended at a stop string" in page.text_content("#summary-a")

    page.click("nav button[data-mode=score]")
    run_on_page(page, {"#prompt": "HAMLET.\nTo be"})
    assert "bits per character" in page.text_content("#summary-a")

    page.fill("#prompt", "To be ¿")
    page.click("#go")
    page.wait_for_selector("#error:not([hidden])")
    assert "the text has" in page.text_content("#error")
    page.close()


def test_the_page_compares_two_runs_on_one_prompt_and_seed(browser, served_runs, server_url,
                                                            capsys):
    random_run = next(p.name for p in served_runs.iterdir() if p.name != TRAINED)
    texts = []
    for run in (TRAINED, random_run):
        code, out, _ = cli_text(served_runs, capsys, "--run", str(served_runs / run), "--prompt",
                                "To", "--max-new-tokens", "40", "--temperature", "1.0",
                                "--seed", "9")
        assert code == 0
        texts.append(out.removesuffix("\n"))
    page = opened_page(browser, server_url)
    page.click("nav button[data-mode=compare]")
    page.select_option("#run", TRAINED)
    page.select_option("#run-b", random_run)
    run_on_page(page, {"#prompt": "To", "#temperature": "1.0", "#seed": "9",
                       "#max_new_tokens": "40"})
    assert [page.text_content("#output-a"), page.text_content("#output-b")] == texts
    assert "seed 9" in page.text_content("#summary-b")
    page.close()
