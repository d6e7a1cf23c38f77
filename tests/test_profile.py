"""profile_model.py: phases that add up, a valid trace, and the config of an existing run."""

from __future__ import annotations

import json
import re

import profile_model
from model import LanguageModel, ModelConfig

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--device", "cpu", "--steps", "3", "--warmup", "1"]


def test_profile_reports_every_phase_adding_up_to_the_step(tmp_path, capsys):
    code = profile_model.main([*TINY, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    shares = dict(re.findall(r"\| (data|forward|backward|optimizer|other) \| [\d.]+ \| "
                             r"([\d.]+)% \|", out))
    assert set(shares) == {"data", "forward", "backward", "optimizer", "other"}
    assert abs(sum(float(v) for v in shares.values()) - 100) < 1.0
    assert float(shares["forward"]) > 0 and float(shares["backward"]) > 0
    assert re.search(r"MFU: [\d.]+% of a measured float32 matmul ceiling", out)
    assert "FLOPs per step" in out and "peak memory" in out
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "data"} <= names
    assert (tmp_path / "profile.md").read_text().startswith("## Phases")


def test_profile_of_a_run_uses_its_saved_config(tmp_path, capsys):
    import train

    runs = tmp_path / "runs"
    assert train.main([*TINY[:-4], "--max-iters", "2", "--eval-iters", "1", "--sample-tokens",
                       "0", "--n-embd", "48", "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    capsys.readouterr()
    assert profile_model.main(["--run", str(run_dir), "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    reported = int(re.search(r"parameters: ([\d,]+)", out).group(1).replace(",", ""))
    saved = json.loads((run_dir / "meta" / "full_config.json").read_text())["model"]
    assert saved["n_embd"] == 48  # not the default width: the profile must use the run's
    assert reported == LanguageModel(ModelConfig(**saved)).num_parameters()
    assert (run_dir / "profile" / "trace.json").is_file()


def test_bad_step_count_is_one_line_and_exit_2(capsys):
    assert profile_model.main(["--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --steps must be at least 1 and --warmup at least 0"]
