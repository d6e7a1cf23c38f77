"""Bad inputs to the scripts, case by case: one line on stderr, exit code 2, and nothing
written (no run folder, no export). The cases past the first list are those generated inputs
(tests/test_generated_inputs.py) found, or the rules they pin, kept as fixed cases.

The same cases, with their fixes, are docs/troubleshooting.md's tables.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import export
import inference
import train
from model import LanguageModel, ModelConfig
from tests.conftest import randomised
from tokenizer import CharTokenizer
from utils.checkpoint import save_export
from utils.runs import create_run

SHORT = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8",
         "--max-iters", "1", "--device", "cpu"]


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# (case id, setup(tmp) -> extra argv, message pattern)
CASES = [
    ("wrong-type", lambda t: ["--batch-size", "lots"],
     r"batch_size: expected an integer, got 'lots' \(from --batch-size\)"),
    ("out-of-range", lambda t: ["--learning-rate", "-1"],
     r"learning_rate must be > 0 \(learning_rate=-1.0 from --learning-rate\)"),
    ("heads-do-not-divide", lambda t: ["--n-embd", "10", "--n-head", "3"],
     r"n_embd=10 must be divisible by n_head=3"),
    ("unknown-flag", lambda t: ["--lerning-rate", "1"],
     r"unknown flag --lerning-rate; did you mean --learning-rate\?"),
    ("unknown-key-in-file", lambda t: ["--config", str(write(t / "c.yaml", b"n_layers: 2\n"))],
     r"unknown config key 'n_layers' in --config .*c.yaml; did you mean 'n_layer'\?"),
    ("unparseable-file", lambda t: ["--config", str(write(t / "c.json", b"{oops"))],
     r"cannot parse config file .*c.json"),
    ("missing-config-file", lambda t: ["--config", str(t / "none.yaml")],
     r"config file .*none.yaml does not exist"),
    ("bad-dtype", lambda t: ["--dtype", "fp8"], r"dtype: expected one of auto, float32"),
    ("data-missing", lambda t: ["--data-path", str(t / "none.txt")],
     r"data file .*none.txt does not exist"),
    ("data-empty", lambda t: ["--data-path", str(write(t / "e.txt", b""))],
     r"--data-path .*e.txt holds no text"),
    ("data-folder-without-text", lambda t: ["--data-path", str(t)],
     r"folder .* holds no .txt \(or .txt.gz\) files"),
    ("data-not-utf8", lambda t: ["--data-path", str(write(t / "l.txt", b"\xff\xfe" * 50))],
     r"is not UTF-8 text"),
    ("data-too-short", lambda t: ["--data-path", str(write(t / "s.txt", b"abcdefghijkl"))],
     r"the val split has 2 tokens but block_size=8 needs at least 9"),
    ("resume-missing-folder", lambda t: ["--resume", str(t / "runs" / "nope")],
     r"run folder .*nope does not exist; pass a run folder such as .*/<id>, or 'latest'"),
    ("resume-no-checkpoint", lambda t: ["--resume", str(t)],
     r"no checkpoint 'last' in .*checkpoints \(available: none"),
    ("resume-corrupt-checkpoint",
     lambda t: (t / "artifacts" / "checkpoints").mkdir(parents=True)
     or write(t / "artifacts" / "checkpoints" / "last.safetensors", b"\x00" * 64)
     and ["--resume", str(t)],
     r"cannot read checkpoint .*last.safetensors .*corrupt or truncated"),
]
# every float is finite, every folder written to is checked first, every seed fits numpy's
CASES += [
    ("learning-rate-inf", lambda t: ["--learning-rate", "inf"],
     r"learning_rate: expected a finite number, got 'inf' \(from --learning-rate\)"),
    ("learning-rate-nan", lambda t: ["--learning-rate", "nan"],
     r"learning_rate: expected a finite number, got 'nan'"),
    ("dropout-overflows", lambda t: ["--dropout", "1e999"],
     r"dropout: expected a finite number, got '1e999'"),
    ("inf-in-a-file", lambda t: ["--config", str(write(t / "c.yaml", b"min_delta: .inf\n"))],
     r"min_delta: expected a finite number, got inf \(from --config .*c.yaml\)"),
    ("runs-dir-is-a-file", lambda t: ["--runs-dir", str(write(t / "f", b"x"))],
     r"--runs-dir .*f is a file, not a folder; pass a folder"),
    ("runs-dir-under-a-file", lambda t: ["--runs-dir", str(write(t / "f", b"x") / "runs")],
     r"--runs-dir .*f/runs cannot be made: .*f is a file, not a folder"),
    ("token-cache-unwritable", lambda t: ["--token-cache", "/proc/chargpt-tokens"],
     r"--token-cache /proc/chargpt-tokens cannot be written: /proc does not let this process "
     r"write in it"),
    ("aim-repo-name-too-long", lambda t: ["--aim", "--aim-repo", str(t / ("x" * 300))],
     r"--aim-repo .* cannot be made: the name x{20}\.\.\. is longer than the 255 bytes"),
    ("seed-negative", lambda t: ["--seed", "-1"], r"seed must be in \[0, 4294967295\]"),
    ("device-not-a-device", lambda t: ["--device", "gpu"],
     r"device must be auto, cpu, mps, cuda or cuda:N"),
    ("model-beyond-memory", lambda t: ["--n-embd", "1000000", "--n-head", "1"],
     r"the model, its optimizer and one batch need at least [\d,.]+ GiB, more than the "
     r"[\d,.]+ GiB of memory cpu has; lower --n-layer, --n-embd, --batch-size or --block-size"),
    ("more-threads-than-cores", lambda t: ["--num-threads", "100000"],
     r"num_threads=100000 but this machine has \d+ CPU cores; pass at most that many"),
    ("empty-value", lambda t: ["--run-tag="],
     r"argument --run-tag: expected a value, got an empty one"),
]
if not torch.cuda.is_available():
    CASES.append(("device-unavailable", lambda t: ["--device", "cuda"],
                  r"device=cuda but CUDA is not available here; use --device cpu or auto"))


@pytest.mark.parametrize(("setup", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, setup, message):
    runs = tmp_path / "runs"
    argv = [*SHORT, "--runs-dir", str(runs), *setup(tmp_path)]
    before = sorted(tmp_path.rglob("*"))
    code = train.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_a_setting_from_the_environment_is_named_in_its_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARGPT_RUNS_DIR", str(write(tmp_path / "f", b"x")))
    assert train.main(SHORT) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: runs_dir (from env CHARGPT_RUNS_DIR) {tmp_path / 'f'} is a file, not a folder; "
        "pass a folder"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with an export, of the GPT-2 layout so that export.py takes it."""
    tokenizer = CharTokenizer.from_text("abcdefgh \n")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                         n_embd=8, position="learned", norm="layernorm", embedding_norm=False,
                         qk_norm=False, mlp="gelu", logit_softcap=None)
    run = create_run(tmp_path_factory.mktemp("runs"), "saved")
    save_export(run.export, randomised(LanguageModel(config)), tokenizer)
    return run.root


# (case id, script's main, setup(tmp, run) -> argv, message pattern)
SCRIPT_CASES = [
    ("export-out-is-a-file", export.main,
     lambda t, run: ["--run", str(run), "--out", str(write(t / "f", b"x"))],
     r"--out .*f is a file, not a folder; pass a folder"),
    ("export-out-unwritable", export.main,
     lambda t, run: ["--run", str(run), "--out", "/proc/nope"],
     r"--out /proc/nope cannot be written: /proc does not let this process write in it"),
    ("export-out-holds-other-files", export.main,
     lambda t, run: (t / "mine").mkdir() or write(t / "mine" / "notes.txt", b"x") and
     ["--run", str(run), "--out", str(t / "mine")],
     r"--out .*mine holds files this script did not write, and writing there would replace "
     r"them; pass a new or empty folder"),
    ("export-run-name-with-a-newline", export.main,
     lambda t, run: ["--run", "two\nlines", "--out", str(t / "hf")],
     r"run folder two\\nlines does not exist"),
    ("export-run-name-too-long", export.main,
     lambda t, run: ["--run", "x" * 300, "--out", str(t / "hf")],
     r"the file system refused: File name too long \(x{300}\); check the paths given"),
    ("inference-temperature-nan", inference.main,
     lambda t, run: ["--run", str(run), "--temperature", "nan"],
     r"argument --temperature: expected a finite number, got 'nan'"),
    ("inference-temperature-inf", inference.main,
     lambda t, run: ["--run", str(run), "--temperature", "inf"],
     r"argument --temperature: expected a finite number, got 'inf'"),
    ("inference-empty-stop", inference.main,
     lambda t, run: ["--run", str(run), "--stop", ""],
     r"argument --stop: expected a value, got an empty one"),
    ("inference-not-a-device", inference.main,
     lambda t, run: ["--run", str(run), "--device", "."],
     r"device='\.' is not a device: pass auto, cpu, mps, cuda or cuda:N"),
    ("inference-cache-beyond-memory", inference.main,
     lambda t, run: ["--run", str(run), "--num-samples", str(10**12)],
     r"the key-value cache of 1,000,000,000,000 samples would need at least [\d,.]+ GiB, more "
     r"than the [\d,.]+ GiB of memory cpu has; lower --num-samples"),
    ("inference-seed-too-large", inference.main,
     lambda t, run: ["--run", str(run), "--seed", str(2**64)],
     r"--seed must be in \[0, 4294967295\], got 18446744073709551616"),
]


@pytest.mark.parametrize(("main", "setup", "message"), [c[1:] for c in SCRIPT_CASES],
                         ids=[c[0] for c in SCRIPT_CASES])
def test_bad_input_to_a_script_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, saved_run,
                                                                     main, setup, message):
    argv = setup(tmp_path, saved_run)
    before = sorted(tmp_path.rglob("*")), sorted(saved_run.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert (sorted(tmp_path.rglob("*")), sorted(saved_run.rglob("*"))) == before


def test_an_earlier_export_is_replaced(tmp_path, capsys, saved_run):
    out = tmp_path / "hf"
    assert export.main(["--run", str(saved_run), "--out", str(out)]) == 0
    (out / "model.safetensors").write_bytes(b"stale")
    assert export.main(["--run", str(saved_run), "--out", str(out)]) == 0, capsys.readouterr()
    assert (out / "model.safetensors").read_bytes() != b"stale"
