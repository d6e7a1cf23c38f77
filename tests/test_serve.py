"""serve.py's API in process: the runs listing, generation equal to inference.py's, scoring
equal to the model's own loss, and every bad request answered 4xx in the command line's
words."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading

import pytest
import torch
from fastapi.testclient import TestClient

import serve
from model import LanguageModel, ModelConfig
from tests.conftest import PROJECT_ROOT
from tests.serving_runs import (
    CORPUS,
    TRAINED,
    app_client,
    cli_text,
    generate,
    generated_text,
)
from utils.run_catalog import RunCatalog
from utils.serving import Limits, ModelCache, score_text

# the runs folder (served_runs) and the app over it (api_client) are tests/conftest.py's, built once
# for this file
pytestmark = pytest.mark.usefixtures("inference_decodes_with_f_linear")


# --- the API ---------------------------------------------------------------------------------

def test_runs_lists_each_run_with_its_results_and_checkpoints(api_client):
    answer = api_client.get("/api/runs").json()
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
def test_generation_gives_the_characters_inference_py_gives(api_client, served_runs, capsys,
                                                             sampling):
    code, out, _ = cli_text(served_runs, capsys, "--run", str(served_runs / TRAINED), "--prompt",
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
    events = generate(api_client, **body)
    # inference.py prints the prompt, the sample and one newline
    assert "HAMLET.\n" + generated_text(events) == out.removesuffix("\n")
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    if "--seed" in flags:
        assert events[0]["seed"] == events[-1]["seed"] == int(flags["--seed"])


def test_each_character_carries_the_models_odds_before_and_after_sampling(api_client, served_runs):
    events = generate(api_client, prompt="To be", max_new_tokens=12, temperature=0.7, top_k=3,
                      seed=5)
    chars = [e for e in events if e["type"] == "char"]
    assert len(chars) == 12 and events[-1]["new_tokens"] == 12
    loaded = ModelCache(RunCatalog(served_runs), torch.device("cpu")).get(TRAINED)
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
    greedy = [e for e in generate(api_client, prompt="To", max_new_tokens=5, temperature=0)
              if e["type"] == "char"]
    assert all(c["p_drawn"] == 1.0 and c["top_drawn"] == [[c["text"], 1.0]] for c in greedy)


def test_a_checkpoint_generates_what_inference_py_loads_from_it(api_client, served_runs, capsys):
    code, out, _ = cli_text(served_runs, capsys, "--run", str(served_runs / TRAINED),
                            "--checkpoint", "step_2", "--prompt", "To", "--max-new-tokens",
                            "30", "--temperature", "0")
    assert code == 0
    events = generate(api_client, checkpoint="step_2", prompt="To", max_new_tokens=30,
                      temperature=0)
    assert "To" + generated_text(events) == out.removesuffix("\n")
    assert events[0]["checkpoint"] == "step_2"


def test_score_is_the_models_own_loss_on_the_text(api_client, served_runs):
    text = "HAMLET.\nTo be, or"  # a context and one: one window
    answer = api_client.post("/api/score", json={"run": TRAINED, "text": text}).json()
    loaded = ModelCache(RunCatalog(served_runs), torch.device("cpu")).get(TRAINED)
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


def test_a_text_longer_than_the_context_is_scored_character_by_character(api_client):
    text = CORPUS[:300]  # many windows of 16
    answer = api_client.post("/api/score", json={"run": TRAINED, "text": text}).json()
    assert answer["scored"] == 299 and len(answer["chars"]) == 300
    assert all(c["bits"] >= 0 and len(c["top"]) == 5 for c in answer["chars"][1:])
    # a character's surprise does not depend on text after it
    shorter = api_client.post("/api/score", json={"run": TRAINED, "text": text[:40]}).json()
    assert [c["bits"] for c in shorter["chars"][:24]] == \
        [c["bits"] for c in answer["chars"][:24]]


def test_a_score_takes_turns_window_by_window(served_runs):
    """Each window's forward holds the lock the generations' steps take turns with."""
    loaded = ModelCache(RunCatalog(served_runs), torch.device("cpu")).get(TRAINED)
    held = []

    class CountingLock:
        def __enter__(self):
            held.append(1)

        def __exit__(self, *exc_info):
            return False

    loaded.turns = CountingLock()
    score_text(loaded, CORPUS[:40], Limits())  # windows of 16 advancing by 8
    assert len(held) == 4


def test_health_names_the_models_loaded(api_client):
    api_client.post("/api/score", json={"run": TRAINED, "text": "To be"})
    health = api_client.get("/health").json()
    assert health["status"] == "ok" and f"{TRAINED}:export" in health["loaded"]
    assert health["active_generations"] == 0


def test_a_load_holds_up_neither_loaded_models_nor_the_list_of_them(served_runs, monkeypatch):
    """While a model loads, a model already loaded is handed out and the list of loaded ones
    (GET /health's) is read at once; asked for again meanwhile, the loading model is loaded
    once and both get it."""
    cache = ModelCache(RunCatalog(served_runs), torch.device("cpu"))
    first = cache.get(TRAINED)
    other = next(p.name for p in served_runs.iterdir() if p.name != TRAINED)
    loading, release, loads = threading.Event(), threading.Event(), []
    real_load = ModelCache._load

    def held_load(self, run, checkpoint):
        loads.append(run.run_id)
        loading.set()
        assert release.wait(timeout=60)
        return real_load(self, run, checkpoint)

    monkeypatch.setattr(ModelCache, "_load", held_load)
    got = {}
    askers = [threading.Thread(target=lambda i=i: got.__setitem__(i, cache.get(other)))
              for i in range(2)]
    askers[0].start()
    assert loading.wait(timeout=60)
    askers[1].start()
    assert cache.get(TRAINED) is first
    assert cache.loaded() == [f"{TRAINED}:export"]
    release.set()
    for asker in askers:
        asker.join(timeout=60)
    assert got[0] is got[1] and got[0].run_id == other and loads == [other]
    assert cache.loaded() == [f"{TRAINED}:export", f"{other}:export"]


def test_the_page_and_its_files_are_served_from_the_project(api_client):
    page = api_client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert api_client.get(f"/static/{name}").status_code == 200
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
def test_a_bad_generation_request_gets_the_command_lines_words(api_client, served_runs, capsys,
                                                                fields, flags):
    response = api_client.post("/api/generate", json={"run": TRAINED, "prompt": "To", **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "\n" not in error and "Traceback" not in error
    if fields == {"prompt": ""}:
        assert error == "the prompt is empty; pass --prompt TEXT with at least one character"
        return
    code, _, err = cli_text(served_runs, capsys, "--run", str(served_runs / TRAINED), "--prompt",
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
    ({"run": TRAINED, "temperature": "0.5"}, 422,
     "argument --temperature: expected a finite number, got '0.5'"),
    ({"run": TRAINED, "max_new_tokens": True}, 422,
     "argument --max-new-tokens: expected an integer, got true"),
], ids=["unknown-run", "dotdot", "absolute", "checkpoint-path", "over-limit", "not-a-number",
        "not-an-integer", "stop-not-a-list", "misspelt-field", "run-not-text",
        "number-as-text", "true-as-a-number"])
def test_a_bad_request_is_a_4xx_with_one_line(api_client, body, status, words):
    response = api_client.post("/api/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error and "\n" not in error


def test_non_finite_values_and_broken_json_are_refused(api_client):
    response = api_client.post("/api/generate", content=b'{"run": "%s", "temperature": NaN}'
                           % TRAINED.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422) and "temperature" in response.json()["error"]
    broken = api_client.post("/api/generate", content=b'{"run": ',
                         headers={"Content-Type": "application/json"})
    assert broken.status_code == 422
    assert broken.json()["error"].startswith("the request body is not valid JSON")


@pytest.mark.parametrize("text,words", [
    ("x" * 401, "this server scores at most 400"),
    ("T", "at least two characters"),
    ("To be ¿", "the text has"),
])
def test_a_bad_score_request_is_a_4xx_with_one_line(api_client, text, words):
    response = api_client.post("/api/score", json={"run": TRAINED, "text": text})
    assert response.status_code == 400 and words in response.json()["error"]


@pytest.mark.parametrize("body,words", [
    ({"run": "a" * 300}, "is not a run id"),
    ({"run": TRAINED, "checkpoint": "step_" + "1" * 300}, "is not one a run has"),
    ({"run": TRAINED, "stop": ["x" * 101]}, "at most 16 stop strings of at most 100"),
    ({"run": TRAINED, "stop": ["a"] * 17}, "at most 16 stop strings"),
    ({"run": TRAINED, "prompt": "T" * 401}, "the prompt is 401 characters"),
])
def test_what_would_cost_the_server_too_much_is_refused(api_client, body, words):
    response = api_client.post("/api/generate", json=body)
    assert response.status_code == 400 and words in response.json()["error"]


def test_every_answer_that_is_not_json_of_a_run_is_an_error_line(api_client):
    wrong_field = api_client.post("/api/generate", json={"run": TRAINED, "text": "To"})
    assert wrong_field.status_code == 422
    assert wrong_field.json()["error"].startswith("unknown field 'text'; this endpoint takes")
    empty = api_client.post("/api/score", content=b"[]",
                            headers={"Content-Type": "application/json"})
    assert empty.json()["error"].startswith("the request body must be a JSON object")
    assert api_client.post("/api/score", json={"run": TRAINED}).json()["error"] == \
        "the field 'text' is required"
    assert api_client.get("/api/nothing").json() == {"error": "Not Found"}
    assert api_client.get("/api/generate").status_code == 405
    assert "error" in api_client.get("/api/generate").json()


def test_a_bad_request_is_refused_before_its_model_loads(served_runs):
    other = next(p.name for p in served_runs.iterdir() if p.name != TRAINED)
    with app_client(served_runs) as client:
        for path, body in (("/api/generate", {"run": other, "temperature": -1}),
                           ("/api/generate", {"run": other, "max_new_tokens": 601}),
                           ("/api/score", {"run": other, "text": "T"})):
            assert client.post(path, json=body).status_code == 400
        assert client.get("/health").json()["loaded"] == []


def test_a_rewritten_checkpoint_replaces_its_older_version_in_the_cache(served_runs, tmp_path):
    """A run still training rewrites last: the next request loads the new file, and the old
    version no longer takes a place among the loaded models."""
    runs = tmp_path / "runs"
    shutil.copytree(served_runs / TRAINED, runs / TRAINED)
    cache = ModelCache(RunCatalog(runs), torch.device("cpu"), capacity=3)
    first = cache.get(TRAINED, "last")
    last = runs / TRAINED / "artifacts" / "checkpoints" / "last.safetensors"
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 10**9))
    assert cache.get(TRAINED, "last") is not first
    assert cache.loaded() == [f"{TRAINED}:last"]


def test_out_of_memory_is_a_503_with_one_line(served_runs, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "1099511627776 bytes")

    def stream_then_no_memory(*args):
        yield {"type": "start"}
        no_memory()

    monkeypatch.setattr(serve, "score_text", no_memory)
    monkeypatch.setattr(serve, "generation_events", stream_then_no_memory)
    with app_client(served_runs) as client:
        response = client.post("/api/score", json={"run": TRAINED, "text": "To be"})
        streamed = client.post("/api/generate", json={"run": TRAINED}).text.splitlines()
    assert response.status_code == 503
    assert response.json() == {"error": serve.OUT_OF_MEMORY}
    assert json.loads(streamed[-1]) == {"type": "error", "error": serve.OUT_OF_MEMORY}


def test_a_run_still_training_is_served_from_a_checkpoint(served_runs, tmp_path, capsys,
                                                          monkeypatch):
    """A run without an export yet: refused with the checkpoints it has, by serve.py as by
    inference.py; with --checkpoint the page opens on it."""
    runs = tmp_path / "runs"
    shutil.copytree(served_runs / TRAINED, runs / TRAINED)
    shutil.rmtree(runs / TRAINED / "artifacts" / "export")
    words = (f"run {runs / TRAINED} has no export yet (train.py writes it when training ends or "
             "is stopped with Ctrl-C); load one of its checkpoints meanwhile with --checkpoint "
             "NAME (best, last, step_4, step_2)")
    assert serve.main(["--runs-dir", str(runs), "--run", TRAINED]) == 2
    assert capsys.readouterr().err.strip() == f"error: {words}"
    assert cli_text(runs, capsys, "--run", str(runs / TRAINED))[2].strip() == f"error: {words}"
    served = {}
    monkeypatch.setattr(serve, "serve_forever", lambda app, sock: served.update(app=app))
    assert serve.main(["--runs-dir", str(runs), "--checkpoint", "last", "--port", "0"]) == 0
    assert f"serving {TRAINED} (last)" in capsys.readouterr().out
    with TestClient(served["app"]) as client:
        answer = client.get("/api/runs").json()
    assert (answer["default"], answer["default_checkpoint"]) == (TRAINED, "last")


def test_the_server_writes_nothing(api_client, served_runs):
    def files() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in served_runs.rglob("*")}

    before = files()
    generate(api_client, prompt="To", max_new_tokens=20, checkpoint="best")
    api_client.post("/api/score", json={"run": TRAINED, "text": "To be"})
    api_client.post("/api/generate", json={"run": "nope"})
    api_client.get("/api/runs")
    assert files() == before
