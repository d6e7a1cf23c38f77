from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime

import torch

from utils.runs import command_line, create_run, environment_report, git_state, write_metadata

NOW = datetime(2026, 1, 2, 3, 4, 5)


def test_run_folder_is_named_by_time_and_tag_with_the_standard_layout(tmp_path):
    run = create_run(tmp_path, "baseline", now=NOW)
    assert run.run_id == "20260102_030405_baseline"
    for sub in ("artifacts/checkpoints", "artifacts/export", "logs/tensorboard", "meta"):
        assert (run.root / sub).is_dir()


def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path):
    ids = [create_run(tmp_path, "same", now=NOW).run_id for _ in range(3)]
    assert ids == ["20260102_030405_same", "20260102_030405_same_2", "20260102_030405_same_3"]


def test_metadata_holds_config_command_environment_and_git_state(tmp_path):
    run = create_run(tmp_path, "meta", now=NOW)
    write_metadata(run, {"train": {"batch_size": 3}}, "python train.py --batch-size 3")
    assert json.loads((run.meta / "full_config.json").read_text()) == {"train": {"batch_size": 3}}
    assert (run.meta / "command.txt").read_text() == "python train.py --batch-size 3\n"
    env = (run.meta / "env.txt").read_text()
    assert f"torch: {torch.__version__}" in env and "cpu count:" in env
    assert re.search(r"^  torch==", env, re.MULTILINE)
    git = (run.meta / "git.txt").read_text()
    assert git.startswith("commit: ") or "not a git checkout" in git


def test_command_line_repeats_config_environment_variables():
    line = command_line("train.py", ["--run-tag", "a b"], {"CHARGPT_SEED": "3", "HOME": "/x"})
    assert line == "CHARGPT_SEED=3 python train.py --run-tag 'a b'"


def test_git_state_outside_a_checkout_says_so(tmp_path):
    assert "not a git checkout" in git_state(tmp_path)


def test_git_state_reports_dirty_tree_with_its_diff(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    assert "state: clean" in git_state(tmp_path)
    (tmp_path / "a.txt").write_text("two\n")
    state = git_state(tmp_path)
    assert "branch: main" in state and "state: dirty" in state
    assert "-one\n+two" in state


def test_environment_report_names_accelerator_availability():
    report = environment_report()
    assert "cuda available:" in report and "mps available:" in report
