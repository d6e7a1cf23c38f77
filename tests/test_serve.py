"""serve.py: the runs listing, generation equal to inference.py's, scoring equal to the model's
own loss, every bad request answered 4xx in the command line's words, several clients at once,
a client that goes away, the command line's own refusals, and the page in a real browser."""

from __future__ import annotations

import contextlib
import io
import json
import math
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
import torch
from fastapi.testclient import TestClient

import inference
import serve
import train
from model import LanguageModel, ModelConfig
from tests.conftest import PROJECT_ROOT, randomised
from tokenizer import CharTokenizer
from utils import decoding
from utils.checkpoint import save_export
from utils.runs import create_run
from utils.serving import Limits, ModelCache, RunCatalog

CORPUS = "".join(f"{name}.\nTo be, or not to be, that is the question {i % 7}.\n"
                 for i, name in enumerate(("HAMLET", "OPHELIA", "HORATIO") * 60))
LIMITS = Limits(max_new_tokens=600, max_score_chars=400)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder with a trained run (export, best, last, step_N, results.json) and an
    exported run with random weights, for comparing."""
    root = tmp_path_factory.mktemp("serve")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    runs = root / "runs"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = train.main(["--data-path", str(root / "corpus.txt"), "--runs-dir", str(runs),
                           "--run-tag", "trained", "--n-layer", "1", "--n-head", "2",
                           "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                           "--max-iters", "4", "--time-budget", "none", "--eval-interval", "2",
                           "--eval-iters", "1", "--checkpoint-interval", "2",
                           "--sample-tokens", "0", "--histogram-interval", "0",
                           "--device", "cpu"])
    assert code == 0
    (trained,) = runs.iterdir()
    tokenizer = CharTokenizer.from_text(CORPUS)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                         n_embd=16)
    other = create_run(runs, "random")
    save_export(other.export, randomised(LanguageModel(config), seed=3), tokenizer)
    os.rename(trained, runs / "20261201_000000_trained")  # the older of the two
    return runs


@pytest.fixture(autouse=True)
def inference_decodes_with_f_linear(monkeypatch):
    """inference.py picks the faster of two float32 layouts by timing them, and the two can
    break a near-tie differently (these tiny models have many); serve.py decodes with
    F.linear. Timed as equals, inference.py takes F.linear too."""
    monkeypatch.setattr(decoding, "decode_step_seconds", lambda model, batch_size: 1.0)


@pytest.fixture(scope="module")
def client(runs_dir: Path) -> Iterator[TestClient]:
    catalog = RunCatalog(runs_dir)
    cache = ModelCache(catalog, torch.device("cpu"), capacity=2)
    app = serve.create_app(catalog, cache, LIMITS, "20261201_000000_trained")
    with TestClient(app) as test_client:
        yield test_client


TRAINED = "20261201_000000_trained"


def generate(client: TestClient, **body) -> list[dict]:
    response = client.post("/api/generate", json={"run": TRAINED, **body})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def generated_text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "char")


def cli_text(runs_dir: Path, capsys, *argv: str) -> tuple[int, str, str]:
    code = inference.main(["--runs-dir", str(runs_dir), "--device", "cpu", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the API ---------------------------------------------------------------------------------

def test_runs_lists_each_run_with_its_results_and_checkpoints(client):
    answer = client.get("/api/runs").json()
    assert answer["default"] == TRAINED
    by_id = {run["id"]: run for run in answer["runs"]}
    assert list(by_id)[1] == TRAINED  # newest first
    trained = by_id[TRAINED]
    assert trained["tag"] == "trained" and trained["steps"] == 4
    assert trained["date"] == "2026-12-01T00:00:00"
    assert trained["full_split_val_bpc"] == pytest.approx(
        trained["full_split_val_loss"] / math.log(2))
    assert trained["checkpoints"] == ["export", "best", "last", "step_4", "step_2"]
    expected = LanguageModel(ModelConfig(vocab_size=len(set(CORPUS)), block_size=16, n_layer=1,
                                         n_head=2, n_embd=16)).num_parameters()
    assert trained["parameters"] == expected
    random_run = next(run for run in answer["runs"] if run["id"] != TRAINED)
    assert random_run["checkpoints"] == ["export"] and random_run["full_split_val_loss"] is None


@pytest.mark.parametrize("sampling", [
    ["--temperature", "0"],
    ["--temperature", "0.9", "--seed", "11"],
    ["--temperature", "1.3", "--top-k", "5", "--top-p", "0.9", "--min-p", "0.05",
     "--repetition-penalty", "1.2", "--seed", "4"],
    ["--temperature", "0.8", "--seed", "2", "--stop", "be"],
], ids=["greedy", "seeded", "every-setting", "stop-string"])
def test_generation_gives_the_characters_inference_py_gives(client, runs_dir, capsys, sampling):
    code, out, _ = cli_text(runs_dir, capsys, "--run", str(runs_dir / TRAINED), "--prompt",
                            "HAMLET.\n", "--max-new-tokens", "60", *sampling)
    assert code == 0
    flags = dict(zip(sampling[::2], sampling[1::2], strict=True))
    body = {"prompt": "HAMLET.\n", "max_new_tokens": 60,
            "temperature": float(flags["--temperature"])}
    for flag, key, kind in (("--seed", "seed", int), ("--top-k", "top_k", int),
                            ("--top-p", "top_p", float), ("--min-p", "min_p", float),
                            ("--repetition-penalty", "repetition_penalty", float)):
        if flag in flags:
            body[key] = kind(flags[flag])
    if "--stop" in flags:
        body["stop"] = [flags["--stop"]]
    events = generate(client, **body)
    # inference.py prints the prompt, the sample and one newline
    assert "HAMLET.\n" + generated_text(events) == out.removesuffix("\n")
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    if "--seed" in flags:
        assert events[0]["seed"] == events[-1]["seed"] == int(flags["--seed"])


def test_each_character_carries_the_models_odds_before_and_after_sampling(client, runs_dir):
    events = generate(client, prompt="To be", max_new_tokens=12, temperature=0.7, top_k=3,
                      seed=5)
    chars = [e for e in events if e["type"] == "char"]
    assert len(chars) == 12 and events[-1]["new_tokens"] == 12
    loaded = ModelCache(RunCatalog(runs_dir), torch.device("cpu")).get(TRAINED)
    ids = torch.tensor([loaded.tokenizer.encode("To be" + chars[0]["text"])])
    with torch.no_grad():
        logits, _ = loaded.model(ids[:, :-1])
    probs = torch.softmax(logits[0, -1], dim=-1)
    first = chars[0]
    assert first["p"] == pytest.approx(float(probs[ids[0, -1]]), abs=1e-5)
    assert [c for c, _ in first["top"]] == [
        loaded.tokenizer.decode([int(i)]) for i in torch.topk(probs, 10).indices]
    for char in chars:
        assert len(char["top"]) == 10 and len(char["top_drawn"]) <= 3  # top-k 3 cut the rest
        assert char["text"] in [c for c, _ in char["top_drawn"]]
        assert sum(p for _, p in char["top_drawn"]) == pytest.approx(1.0, abs=1e-4)
        assert [p for _, p in char["top"]] == sorted((p for _, p in char["top"]), reverse=True)
    greedy = [e for e in generate(client, prompt="To", max_new_tokens=5, temperature=0)
              if e["type"] == "char"]
    assert all(c["p_drawn"] == 1.0 and c["top_drawn"] == [[c["text"], 1.0]] for c in greedy)


def test_a_checkpoint_generates_what_inference_py_loads_from_it(client, runs_dir, capsys):
    code, out, _ = cli_text(runs_dir, capsys, "--run", str(runs_dir / TRAINED),
                            "--checkpoint", "step_2", "--prompt", "To", "--max-new-tokens",
                            "30", "--temperature", "0")
    assert code == 0
    events = generate(client, checkpoint="step_2", prompt="To", max_new_tokens=30,
                      temperature=0)
    assert "To" + generated_text(events) == out.removesuffix("\n")
    assert events[0]["checkpoint"] == "step_2"


def test_score_is_the_models_own_loss_on_the_text(client, runs_dir):
    text = "HAMLET.\nTo be, or"  # a context and one: one window
    answer = client.post("/api/score", json={"run": TRAINED, "text": text}).json()
    loaded = ModelCache(RunCatalog(runs_dir), torch.device("cpu")).get(TRAINED)
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        _, loss = loaded.model(ids[:, :-1], ids[:, 1:])
    assert answer["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert answer["bits_per_character"] == pytest.approx(float(loss) / math.log(2), abs=1e-5)
    assert answer["scored"] == len(text) - 1
    assert "".join(c["text"] for c in answer["chars"]) == text
    assert answer["chars"][0]["bits"] is None
    bits = [c["bits"] for c in answer["chars"][1:]]
    assert sum(bits) / len(bits) == pytest.approx(answer["bits_per_character"], abs=1e-3)


def test_a_text_longer_than_the_context_is_scored_character_by_character(client):
    text = CORPUS[:300]  # many windows of 16
    answer = client.post("/api/score", json={"run": TRAINED, "text": text}).json()
    assert answer["scored"] == 299 and len(answer["chars"]) == 300
    assert all(c["bits"] >= 0 and len(c["top"]) == 5 for c in answer["chars"][1:])
    # a character's surprise does not depend on text after it
    shorter = client.post("/api/score", json={"run": TRAINED, "text": text[:40]}).json()
    assert [c["bits"] for c in shorter["chars"][:24]] == \
        [c["bits"] for c in answer["chars"][:24]]


def test_health_names_the_models_loaded(client):
    client.post("/api/score", json={"run": TRAINED, "text": "To be"})
    health = client.get("/health").json()
    assert health["status"] == "ok" and f"{TRAINED}:export" in health["loaded"]
    assert health["active_generations"] == 0


def test_the_page_and_its_files_are_served_from_the_project(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    # nothing is fetched from elsewhere: the page works offline
    for name in ("index.html", "app.js", "style.css"):
        assert "http" not in (PROJECT_ROOT / "static" / name).read_text(encoding="utf-8")


# --- bad requests ----------------------------------------------------------------------------

CLI_REFUSALS = [  # (request fields, the same request's inference.py flags)
    ({"temperature": -1}, ["--temperature", "-1"]),
    ({"top_p": 2}, ["--top-p", "2"]),
    ({"top_k": 0}, ["--top-k", "0"]),
    ({"min_p": 1.5}, ["--min-p", "1.5"]),
    ({"repetition_penalty": 0}, ["--repetition-penalty", "0"]),
    ({"max_new_tokens": 0}, ["--max-new-tokens", "0"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"prompt": "ROMEO: ¿qué?"}, ["--prompt", "ROMEO: ¿qué?"]),
    ({"prompt": ""}, ["--prompt", " "]),  # the CLI refuses an empty flag value first
    ({"stop": [""]}, ["--stop", ""]),
    ({"checkpoint": "step_99"}, ["--checkpoint", "step_99"]),
]


@pytest.mark.parametrize("fields,flags", CLI_REFUSALS,
                         ids=[next(iter(fields)) for fields, _ in CLI_REFUSALS])
def test_a_bad_generation_request_gets_the_command_lines_words(client, runs_dir, capsys,
                                                                fields, flags):
    response = client.post("/api/generate", json={"run": TRAINED, "prompt": "To", **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "\n" not in error and "Traceback" not in error
    if fields == {"prompt": ""}:
        assert error == "the prompt is empty; pass --prompt TEXT with at least one character"
        return
    code, _, err = cli_text(runs_dir, capsys, "--run", str(runs_dir / TRAINED), "--prompt",
                            "To", *flags)
    assert code == 2
    cli_error = err.strip().splitlines()[-1].removeprefix("error: ")
    if "checkpoint" in fields:  # the CLI names the run by the path it was given
        assert error.startswith("no checkpoint 'step_99' in") and "available: " in error
    else:
        assert error == cli_error.removesuffix("; see --help")


@pytest.mark.parametrize("body,status,words", [
    ({"run": "nope"}, 400, "no run 'nope' in"),
    ({"run": "../runs"}, 400, "is not a run id"),
    ({"run": "/etc"}, 400, "is not a run id"),
    ({"run": TRAINED, "checkpoint": "../../x"}, 400, "is not one a run has"),
    ({"run": TRAINED, "max_new_tokens": 601}, 400, "at most 600 on this server"),
    ({"run": TRAINED, "temperature": "warm"}, 422,
     "argument --temperature: expected a finite number, got 'warm'"),
    ({"run": TRAINED, "max_new_tokens": 2.5}, 422, "argument --max-new-tokens: expected an "
     "integer"),
    ({"run": TRAINED, "stop": "be"}, 422, "argument --stop: expected a list of strings"),
    ({"run": TRAINED, "temprature": 0}, 422,
     "unknown field 'temprature'; did you mean 'temperature'?"),
    ({"run": 5}, 422, "argument --run: expected text"),
], ids=["unknown-run", "dotdot", "absolute", "checkpoint-path", "over-limit", "not-a-number",
        "not-an-integer", "stop-not-a-list", "misspelt-field", "run-not-text"])
def test_a_bad_request_is_a_4xx_with_one_line(client, body, status, words):
    response = client.post("/api/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error and "\n" not in error


def test_non_finite_values_and_broken_json_are_refused(client):
    response = client.post("/api/generate", content=b'{"run": "%s", "temperature": NaN}'
                           % TRAINED.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422) and "temperature" in response.json()["error"]
    broken = client.post("/api/generate", content=b'{"run": ',
                         headers={"Content-Type": "application/json"})
    assert broken.status_code == 422
    assert broken.json()["error"].startswith("the request body is not valid JSON")


@pytest.mark.parametrize("text,words", [
    ("x" * 401, "this server scores at most 400"),
    ("T", "at least two characters"),
    ("To be ¿", "the text has"),
])
def test_a_bad_score_request_is_a_4xx_with_one_line(client, text, words):
    response = client.post("/api/score", json={"run": TRAINED, "text": text})
    assert response.status_code == 400 and words in response.json()["error"]


def test_a_symlink_out_of_the_runs_folder_is_refused(client, runs_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs_dir / TRAINED, outside)
    link = runs_dir / "20261202_000000_link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        response = client.post("/api/score", json={"run": link.name, "text": "To be"})
        assert response.status_code == 400
        assert "leads out of" in response.json()["error"]
        assert link.name not in [run["id"] for run in client.get("/api/runs").json()["runs"]]
    finally:
        link.unlink()


@pytest.mark.parametrize("body,words", [
    ({"run": "a" * 300}, "is not a run id"),
    ({"run": TRAINED, "checkpoint": "step_" + "1" * 300}, "is not one a run has"),
    ({"run": TRAINED, "stop": ["x" * 101]}, "at most 16 stop strings of at most 100"),
    ({"run": TRAINED, "stop": ["a"] * 17}, "at most 16 stop strings"),
    ({"run": TRAINED, "prompt": "T" * 401}, "the prompt is 401 characters"),
])
def test_what_would_cost_the_server_too_much_is_refused(client, body, words):
    response = client.post("/api/generate", json=body)
    assert response.status_code == 400 and words in response.json()["error"]


def test_every_answer_that_is_not_json_of_a_run_is_an_error_line(client):
    wrong_field = client.post("/api/generate", json={"run": TRAINED, "text": "To"})
    assert wrong_field.status_code == 422
    assert wrong_field.json()["error"].startswith("unknown field 'text'; this endpoint takes")
    empty = client.post("/api/score", content=b"[]", headers={"Content-Type": "application/json"})
    assert empty.json()["error"].startswith("the request body must be a JSON object")
    assert client.post("/api/score", json={"run": TRAINED}).json()["error"] == \
        "the field 'text' is required"
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    assert client.get("/api/generate").status_code == 405
    assert "error" in client.get("/api/generate").json()


def test_latest_takes_the_newest_run_that_has_the_checkpoint_asked_for(client):
    # the newest run has an export only: inference.py --run latest --checkpoint best takes
    # the trained one, and so does the server
    events = generate(client, run="latest", checkpoint="best", prompt="To",
                      max_new_tokens=10, temperature=0)
    assert events[0]["run"] == TRAINED
    assert generate(client, run="latest", prompt="To", max_new_tokens=2)[0]["run"] != TRAINED


def test_a_run_the_core_cannot_read_is_a_4xx(client, runs_dir):
    broken = runs_dir / "20261203_000000_broken"
    shutil.copytree(runs_dir / TRAINED, broken)
    (broken / "artifacts" / "export" / "tokenizer.json").write_text('{"chars": 5}')
    (broken / "meta" / "results.json").write_text("[1, 2]")  # not what train.py writes
    try:
        listed = {run["id"]: run for run in client.get("/api/runs").json()["runs"]}
        assert listed[broken.name]["full_split_val_loss"] is None
        response = client.post("/api/score", json={"run": broken.name, "text": "To be"})
        assert response.status_code == 400 and "tokenizer" in response.json()["error"]
    finally:
        shutil.rmtree(broken)


def test_a_symlink_inside_a_run_out_of_the_runs_folder_is_refused(client, runs_dir, tmp_path):
    run = runs_dir / "20261204_000000_inner"
    shutil.copytree(runs_dir / TRAINED, run)
    shutil.move(run / "artifacts", tmp_path / "artifacts")
    (run / "artifacts").symlink_to(tmp_path / "artifacts", target_is_directory=True)
    try:
        assert run.name not in [r["id"] for r in client.get("/api/runs").json()["runs"]]
        response = client.post("/api/score", json={"run": run.name, "text": "To be"})
        assert response.status_code == 400 and "leads out of" in response.json()["error"]
    finally:
        shutil.rmtree(run)


def test_the_server_writes_nothing(client, runs_dir):
    def files() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in runs_dir.rglob("*")}

    before = files()
    generate(client, prompt="To", max_new_tokens=20, checkpoint="best")
    client.post("/api/score", json={"run": TRAINED, "text": "To be"})
    client.post("/api/generate", json={"run": "nope"})
    client.get("/api/runs")
    assert files() == before


# --- a real server: several clients, a client that goes away, the command line ----------------

def start_server(runs_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """serve.py on any free loopback port, and its base URL once it has printed it (it
    listens from then on)."""
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "serve.py"), "--runs-dir", str(runs_dir), "--port",
         "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    line = process.stdout.readline()
    match = re.search(r"http://\S+:(\d+)/", line)
    if match is None:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(line + process.communicate(timeout=30)[1])
    return process, f"http://127.0.0.1:{match.group(1)}"


@contextlib.contextmanager
def running_server(runs_dir: Path, *flags: str) -> Iterator[str]:
    process, url = start_server(runs_dir, *flags)
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def post_stream(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return [json.loads(line) for line in response]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_eight_clients_stream_at_once_each_with_its_own_seeds_text(client, runs_dir):
    bodies = [{"run": TRAINED, "prompt": "To", "max_new_tokens": 500, "temperature": 1.0,
               "seed": seed} for seed in range(8)]
    alone = [generated_text(generate(client, **{k: v for k, v in body.items() if k != "run"}))
             for body in bodies]
    results: dict[int, str] = {}
    with running_server(runs_dir) as url:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, generated_text(post_stream(f"{url}/api/generate", bodies[i]))))
            for i in range(8)]
        for thread in threads:
            thread.start()
        # while they stream, the page and the API answer, and the streams run side by side
        most_at_once = 0
        while any(thread.is_alive() for thread in threads):
            most_at_once = max(most_at_once, get_json(f"{url}/health")["active_generations"])
            with urllib.request.urlopen(f"{url}/", timeout=30) as page:
                assert page.status == 200
        for thread in threads:
            thread.join()
    assert [results.get(i) for i in range(8)] == alone
    assert len(set(alone)) == 8
    assert most_at_once >= 2


def test_a_client_that_goes_away_ends_its_generation(runs_dir):
    with running_server(runs_dir, "--max-new-tokens", "100000") as url:
        request = urllib.request.Request(
            f"{url}/api/generate", json.dumps({"run": TRAINED, "max_new_tokens": 100000,
                                              "temperature": 1.0}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=60)
        response.readline()
        response.readline()  # a character has been sent: the generation is under way
        assert get_json(f"{url}/health")["active_generations"] == 1
        response.close()  # what the page's Stop does: the connection goes
        deadline = time.monotonic() + 60
        while get_json(f"{url}/health")["active_generations"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get_json(f"{url}/health")["active_generations"] == 0


def refusal(capsys, *argv: str) -> str:
    """serve.py's one error line for argv, after checking it exits 2 without a traceback."""
    code = serve.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert err.rstrip().endswith(line)
    return line


def test_the_command_line_refuses_what_it_cannot_serve(runs_dir, tmp_path, capsys):
    assert "does not exist" in refusal(capsys, "--runs-dir", str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    assert "no runs in" in refusal(capsys, "--runs-dir", str(tmp_path / "empty"))
    assert "no run 'nope'" in refusal(capsys, "--runs-dir", str(runs_dir), "--run", "nope")
    assert "--port must be in" in refusal(capsys, "--runs-dir", str(runs_dir), "--port",
                                          "70000")
    assert "--max-loaded must be at least 1" in refusal(capsys, "--runs-dir", str(runs_dir),
                                                        "--max-loaded", "0")
    assert "is not an address" in refusal(capsys, "--runs-dir", str(runs_dir), "--host",
                                          "no.such.host.invalid")
    with socket_in_use() as port:
        line = refusal(capsys, "--runs-dir", str(runs_dir), "--port", str(port))
        assert f"port {port} is in use" in line


@contextlib.contextmanager
def socket_in_use() -> Iterator[int]:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_run_folder_path_is_taken_like_inference_py_takes_it(runs_dir):
    with running_server(runs_dir, "--run", str(runs_dir / TRAINED)) as url:
        assert get_json(f"{url}/api/runs")["default"] == TRAINED


def test_listening_beyond_loopback_warns(runs_dir):
    process, _ = start_server(runs_dir, "--host", "0.0.0.0")
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert "anyone who can reach this machine can use the page" in err


def test_ctrl_c_stops_the_server_while_a_client_streams(runs_dir):
    process, url = start_server(runs_dir, "--max-new-tokens", "100000")
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


def test_ctrl_c_twice_ends_the_server_at_once_without_a_traceback(runs_dir):
    process, url = start_server(runs_dir)
    get_json(f"{url}/health")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err, err


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
        browser, runs_dir, capsys):
    code, out, _ = cli_text(runs_dir, capsys, "--run", str(runs_dir / TRAINED), "--prompt",
                            "HAMLET.", "--max-new-tokens", "80", "--temperature", "0")
    assert code == 0
    with running_server(runs_dir) as url:
        page = opened_page(browser, url)
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

        page.click("nav button[data-mode=score]")
        run_on_page(page, {"#prompt": "HAMLET.\nTo be"})
        assert "bits per character" in page.text_content("#summary-a")

        page.fill("#prompt", "To be ¿")
        page.click("#go")
        page.wait_for_selector("#error:not([hidden])")
        assert "the text has" in page.text_content("#error")
        page.close()


def test_the_page_compares_two_runs_on_one_prompt_and_seed(browser, runs_dir, capsys):
    random_run = next(p.name for p in runs_dir.iterdir() if p.name != TRAINED)
    texts = []
    for run in (TRAINED, random_run):
        code, out, _ = cli_text(runs_dir, capsys, "--run", str(runs_dir / run), "--prompt",
                                "To", "--max-new-tokens", "40", "--temperature", "1.0",
                                "--seed", "9")
        assert code == 0
        texts.append(out.removesuffix("\n"))
    with running_server(runs_dir) as url:
        page = opened_page(browser, url)
        page.click("nav button[data-mode=compare]")
        page.select_option("#run", TRAINED)
        page.select_option("#run-b", random_run)
        run_on_page(page, {"#prompt": "To", "#temperature": "1.0", "#seed": "9",
                           "#max_new_tokens": "40"})
        assert [page.text_content("#output-a"), page.text_content("#output-b")] == texts
        assert "seed 9" in page.text_content("#summary-b")
        page.close()
