"""train.py --init-from: a new run that starts from another run's weights."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

import train
from tests.conftest import run_script

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "3", "--sample-tokens", "0", "--no-aim"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path, str]:
    """A finished run on a small text, trained in this process: (its folder, the text, its
    output)."""
    root = tmp_path_factory.mktemp("finetune")
    text = root / "play.txt"
    text.write_text("".join(f"ROMEO.\nBut soft, what light through yonder window {i % 5}.\n"
                            for i in range(300)), encoding="utf-8")
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = train.main([*TINY, "--data-path", str(text), "--max-iters", "12",
                           "--eval-interval", "6", "--checkpoint-interval", "6",
                           "--runs-dir", str(root / "runs"), "--run-tag", "parent"])
    assert code == 0, output.getvalue()
    (run,) = (root / "runs").iterdir()
    return run, text, output.getvalue()


def fine_tune(parent_run: Path, tmp_path: Path, *flags: str):
    return run_script("train.py", *TINY, "--init-from", str(parent_run),
                      "--runs-dir", str(tmp_path / "runs"), *flags)


def evaluations(output: str) -> dict[int, tuple[float, float]]:
    return {int(step): (float(train), float(val)) for step, train, val in re.findall(
        r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", output)}


def test_the_first_evaluation_of_a_fine_tune_is_the_parents_last(parent, tmp_path):
    """On the parent's own text, the fine-tuning run starts exactly where the parent ended."""
    run, text, parent_output = parent
    result = fine_tune(run, tmp_path, "--data-path", str(text), "--max-iters", "4",
                       "--eval-interval", "4")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert evaluations(output)[0] == evaluations(parent_output)[12]
    assert re.search(r"run \S+ at step 0", output)  # a new run, from step 0
    (child,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((child / "meta" / "parent.json").read_text())
    assert recorded == {"run": str(run), "export": str(run / "artifacts" / "export")}
    exported = json.loads((child / "artifacts" / "export" / "tokenizer.json").read_text())
    assert exported == json.loads((run / "artifacts" / "export" / "tokenizer.json").read_text())
    saved = json.loads((child / "meta" / "full_config.json").read_text())
    assert saved["train"]["max_iters"] == 4 and saved["model"]["n_embd"] == 16


def fine_tune_in_process(parent_run: Path, tmp_path: Path, capsys, *flags: str) -> str:
    """fine_tune's run, in this process (the test above runs the command line); its output."""
    code = train.main([*TINY, "--init-from", str(parent_run), "--runs-dir", str(tmp_path / "runs"),
                       *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out + captured.err


def test_a_fine_tune_can_start_from_a_named_checkpoint_on_new_text(parent, tmp_path, capsys):
    run, text, parent_output = parent
    scene = tmp_path / "scene.txt"
    scene.write_text("But soft, what light.\n" * 40, encoding="utf-8")  # within the vocabulary
    output = fine_tune_in_process(run, tmp_path, capsys, "--init-from-checkpoint", "step_6",
                                  "--data-path", str(text), "--max-iters", "2",
                                  "--eval-interval", "2")
    assert evaluations(output)[0] == evaluations(parent_output)[6]
    (child,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((child / "meta" / "parent.json").read_text())
    assert recorded["checkpoint"] == str(run / "artifacts" / "checkpoints" / "step_6.safetensors")
    # dropout may differ: it is not part of the shape
    fine_tune_in_process(run, tmp_path, capsys, "--data-path", str(scene), "--max-iters", "2",
                         "--dropout", "0.1")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-layer", "2"], r"cannot set n_layer=2 \(--n-layer\) when fine-tuning: the run "
                             r"being fine-tuned has n_layer=1, and fine-tuning keeps its model "
                             r"shape; leave it out"),
        (["--position", "learned"], r"cannot set position=learned \(--position\) .*"),
        (["--data-path", "{odd}"], r".*odd.txt: 3 character\(s\) outside the vocabulary: 'Z', "
                                   r"'é', '☃' of the run it continues, which cannot encode "
                                   r"them; use text within its vocabulary"),
        (["--init-from-checkpoint", "step_99"],
         r"no checkpoint 'step_99' in .* \(available: best, last, step_12, step_6\)"),
        (["--resume", "latest"], r"--resume continues a run in its own folder and --init-from "
                                 r"starts a new run from one; pass one of them"),
    ],
    ids=["shape-flag", "architecture-flag", "characters-outside-the-vocabulary",
         "missing-checkpoint", "with-resume"],
)
def test_fine_tune_refusals_are_one_line_and_make_no_run(parent, tmp_path, flags, message,
                                                        capsys):
    run, text, _ = parent
    odd = tmp_path / "odd.txt"
    odd.write_text("ROMEO. Zé ☃ " * 20, encoding="utf-8")
    flags = [flag.format(odd=odd) for flag in flags]
    if "--data-path" not in flags:
        flags += ["--data-path", str(text)]
    # in process, as the command line runs it: train.main prints the error and returns the code
    code = train.main([*TINY, "--init-from", str(run), "--runs-dir", str(tmp_path / "runs"),
                       *flags, "--max-iters", "2"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch("error: " + message, lines[0]), lines
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_name_needs_a_run_to_take_it_from(tmp_path, capsys):
    assert train.main(["--init-from-checkpoint", "last", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --init-from-checkpoint names a checkpoint "
                                               "of the --init-from run; pass --init-from RUN too")
