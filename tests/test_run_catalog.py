"""The runs serve.py offers (utils/run_catalog.py), through its API: 'latest', a run the core
cannot read, and symlinks that lead out of the runs folder or round in a loop."""

from __future__ import annotations

import shutil

from tests.serving_runs import TRAINED, generate


def test_a_symlink_out_of_the_runs_folder_is_refused(api_client, served_runs, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(served_runs / TRAINED, outside)
    link = served_runs / "20261202_000000_link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        response = api_client.post("/api/score", json={"run": link.name, "text": "To be"})
        assert response.status_code == 400
        assert "leads out of" in response.json()["error"]
        assert link.name not in [run["id"] for run in api_client.get("/api/runs").json()["runs"]]
    finally:
        link.unlink()


def test_latest_takes_the_newest_run_that_has_the_checkpoint_asked_for(api_client):
    # the newest run has an export only: inference.py --run latest --checkpoint best takes
    # the trained one, and so does the server
    events = generate(api_client, run="latest", checkpoint="best", prompt="To",
                      max_new_tokens=10, temperature=0)
    assert events[0]["run"] == TRAINED
    assert generate(api_client, run="latest", prompt="To", max_new_tokens=2)[0]["run"] != TRAINED


def test_a_run_the_core_cannot_read_is_a_4xx(api_client, served_runs):
    broken = served_runs / "20261203_000000_broken"
    shutil.copytree(served_runs / TRAINED, broken)
    (broken / "artifacts" / "export" / "tokenizer.json").write_text('{"chars": 5}')
    (broken / "meta" / "results.json").write_text("[1, 2]")  # not what train.py writes
    try:
        listed = {run["id"]: run for run in api_client.get("/api/runs").json()["runs"]}
        assert listed[broken.name]["full_split_val_loss"] is None
        response = api_client.post("/api/score", json={"run": broken.name, "text": "To be"})
        assert response.status_code == 400 and "tokenizer" in response.json()["error"]
    finally:
        shutil.rmtree(broken)


def test_a_symlink_inside_a_run_out_of_the_runs_folder_is_refused(api_client, served_runs,
                                                                   tmp_path):
    run = served_runs / "20261204_000000_inner"
    shutil.copytree(served_runs / TRAINED, run)
    shutil.move(run / "artifacts", tmp_path / "artifacts")
    (run / "artifacts").symlink_to(tmp_path / "artifacts", target_is_directory=True)
    # the export's tokenizer alone out of the folder: its checkpoints are served, not it
    only_tokenizer = served_runs / "20261204_000001_tokenizer"
    shutil.copytree(served_runs / TRAINED, only_tokenizer)
    tokenizer = only_tokenizer / "artifacts" / "export" / "tokenizer.json"
    shutil.move(tokenizer, tmp_path / "tokenizer.json")
    tokenizer.symlink_to(tmp_path / "tokenizer.json")
    try:
        listed = {r["id"]: r for r in api_client.get("/api/runs").json()["runs"]}
        assert run.name not in listed
        assert listed[only_tokenizer.name]["checkpoints"][0] == "best"
        response = api_client.post("/api/score", json={"run": run.name, "text": "To be"})
        assert response.status_code == 400 and "leads out of" in response.json()["error"]
        response = api_client.post("/api/score", json={"run": only_tokenizer.name,
                                                       "text": "To be"})
        assert response.status_code == 400 and "leads out of" in response.json()["error"]
    finally:
        shutil.rmtree(run)
        shutil.rmtree(only_tokenizer)


def test_a_symlink_loop_in_a_run_is_left_out_and_refused(api_client, served_runs):
    run = served_runs / "20261205_000000_loop"
    shutil.copytree(served_runs / TRAINED, run)
    loop = run / "artifacts" / "checkpoints" / "step_9.safetensors"
    loop.symlink_to(loop)
    try:
        listed = {r["id"]: r for r in api_client.get("/api/runs").json()["runs"]}
        assert "step_9" not in listed[run.name]["checkpoints"]
        assert "best" in listed[run.name]["checkpoints"]
        response = api_client.post("/api/score", json={"run": run.name, "checkpoint": "step_9",
                                                       "text": "To be"})
        assert response.status_code == 400 and "leads out of" in response.json()["error"]
    finally:
        shutil.rmtree(run)
