"""inference.py: loading a run's export, streaming, stop strings, and bad input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import inference
from model import LanguageModel, ModelConfig
from tests.conftest import randomised
from tokenizer import CharTokenizer
from utils import decoding, private_torch
from utils.checkpoint import load_export, save_export, weights_of
from utils.decoding import DecodeLinear
from utils.runs import create_run
from utils.sampling import StopFilter

VOCAB = "\nabcdefghijklmnopqrstuvwxyz .,"


@pytest.fixture
def exported_run(tmp_path: Path) -> Path:
    tokenizer = CharTokenizer.from_text(VOCAB)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                         n_embd=16, dropout=0.0)
    run = create_run(tmp_path / "runs", "infer")
    save_export(run.export, randomised(LanguageModel(config)), tokenizer)
    return run.root


def run_inference(capsys, *argv: str) -> tuple[int, str, str]:
    code = inference.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streams_prompt_and_reports_timings(exported_run, capsys):
    code, out, err = run_inference(capsys, "--run", str(exported_run), "--prompt", "to be",
                                   "--max-new-tokens", "20", "--seed", "1")
    assert code == 0
    assert out.startswith("to be") and len(out) == len("to be") + 20 + 1
    assert err.strip().splitlines()[-1].startswith("prompt tokens 5, new tokens 20, prefill ")
    assert "tokens/s, seed 1" in err


def test_same_seed_gives_the_same_text_and_cache_matches_no_cache(exported_run, capsys):
    args = ["--run", str(exported_run), "--max-new-tokens", "40", "--seed", "3"]
    first = run_inference(capsys, *args)[1]
    assert run_inference(capsys, *args)[1] == first
    assert run_inference(capsys, *args, "--no-kv-cache")[1] == first
    assert run_inference(capsys, *args, "--no-stream")[1] == first


def printed_samples(out: str) -> list[str]:
    """The samples of a --no-stream run: inference.py ends its output with one newline, and a
    sample may itself end in newlines, so exactly one is taken off."""
    assert out.endswith("\n")
    return out[:-1].split(inference.SAMPLE_SEPARATOR)


def test_several_samples_are_printed_one_after_another(exported_run, capsys):
    _, out, _ = run_inference(capsys, "--run", str(exported_run), "--num-samples", "3",
                              "--max-new-tokens", "10", "--prompt", "a", "--seed", "2")
    samples = printed_samples(out)
    assert len(samples) == 3 and all(s.startswith("a") and len(s) == 11 for s in samples)


def test_latest_picks_the_newest_run_with_an_export(exported_run, capsys):
    runs_dir = exported_run.parent
    create_run(runs_dir, "zz_no_export")  # newer, but has nothing to load
    code, _, err = run_inference(capsys, "--runs-dir", str(runs_dir), "--max-new-tokens", "5",
                                 "--seed", "0")
    assert code == 0, err


@pytest.mark.parametrize(
    ("stops", "pieces", "shown"),
    [
        (["ab"], ["x", "a", "b", "y"], ["x", "", "", ""]),  # 'a' held back, then a match
        (["ab"], ["x", "a", "c"], ["x", "", "ac"]),  # 'a' released once ruled out
        (["\n\n", "END"], ["hi", "\n", "E", "N", "D"], ["hi", "", "\n", "", ""]),
        (["ab"], ["x", "a"], ["x", "a"]),  # a held-back tail is shown when generation ends
        ([], ["a", "b"], ["a", "b"]),
    ],
)
def test_stop_filter_never_shows_part_of_a_stop_string(stops, pieces, shown):
    stop_filter = StopFilter(stops)
    outputs = [stop_filter.feed(p) for p in pieces]
    outputs[-1] += stop_filter.flush()
    assert outputs == shown


def test_generation_ends_at_the_stop_string(exported_run, capsys):
    args = ["--run", str(exported_run), "--max-new-tokens", "200", "--seed", "4",
            "--temperature", "0", "--prompt", "a"]
    generated = run_inference(capsys, *args)[1][1:-1]  # without the prompt and final newline
    stop = generated[5:7]  # greedy output is deterministic, so it holds this stop string
    code, out, _ = run_inference(capsys, *args, "--stop", stop)
    assert code == 0
    assert out == "a" + generated[:generated.index(stop)] + "\n"


def test_bad_input_gets_one_line_and_exit_2(exported_run, tmp_path, capsys):
    run = str(exported_run)
    cases = [
        (["--run", str(tmp_path / "missing")], "run folder .*missing does not exist"),
        (["--run", run, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--run", run, "--top-p", "0"], r"--top-p: top_p must be in \(0, 1\]"),
        (["--run", run, "--temperature", "-0.5"], "--temperature: temperature must be >= 0"),
        (["--run", run, "--prompt", "ZQ!"], r"the prompt has 3 character\(s\) outside the "
                                            r"vocabulary: '!', 'Q', 'Z'"),
        (["--run", run, "--top-k", "x"], "argument --top-k: expected an integer, got 'x'"),
        (["--run", run, "--quantize", "int8", "--dtype", "bfloat16"],
         "--quantize int8 and --dtype bfloat16 each set the weights' precision; pass one of them"),
        (["--run", run, "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--run", run, "--compile", "--quantize", "int8"],
         "--compile compiles float32 or bfloat16 decoding; --quantize int8 measured no faster "
         "compiled"),
        (["--run", run, "--compile", "--no-kv-cache"],
         "--compile compiles the cached decode step, which --no-kv-cache turns off"),
    ]
    for argv, message in cases:
        code, out, err = run_inference(capsys, *argv)
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(message, lines[0]), (message, lines[0])


def test_run_without_export_says_how_to_make_one(tmp_path, capsys):
    run = create_run(tmp_path, "empty")
    code, _, err = run_inference(capsys, "--run", str(run.root))
    assert code == 2
    assert "has no complete export yet" in err and "python train.py" in err


def test_corrupt_weights_are_reported(exported_run, capsys):
    weights = exported_run / "artifacts" / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_inference(capsys, "--run", str(exported_run))
    assert code == 2 and "corrupt or truncated" in err


def test_config_that_does_not_match_the_weights_names_the_tensor(exported_run, capsys):
    export = exported_run / "artifacts" / "export"
    model, _ = load_export(export)
    weights = weights_of(model)
    weights["blocks.0.mlp.fc.weight"] = torch.zeros(3, 3)
    save_file(weights, export / "model.safetensors")
    code, _, err = run_inference(capsys, "--run", str(exported_run))
    assert code == 2
    assert "tensor blocks.0.mlp.fc.weight has shape (3, 3) but the config gives (64, 16)" in err


@pytest.fixture
def trained_run(tmp_path: Path) -> Path:
    import train

    code = train.main(["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                       "--batch-size", "4", "--max-iters", "30", "--eval-interval", "10",
                       "--eval-iters", "2", "--checkpoint-interval", "10", "--sample-tokens",
                       "0", "--device", "cpu", "--runs-dir", str(tmp_path / "runs")])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("name", ["last", "best", "step_20"])
def test_generates_from_a_named_checkpoint(trained_run, capsys, name):
    code, out, err = run_inference(capsys, "--run", str(trained_run), "--checkpoint", name,
                                   "--max-new-tokens", "10", "--seed", "0")
    assert code == 0, err
    assert len(out) == 1 + 10 + 1


def test_last_checkpoint_generates_what_the_export_does(trained_run, capsys):
    args = ["--run", str(trained_run), "--max-new-tokens", "30", "--seed", "5"]
    assert run_inference(capsys, *args)[1] == run_inference(capsys, *args, "--checkpoint",
                                                            "last")[1]


def test_unknown_checkpoint_lists_the_available_ones(trained_run, capsys):
    code, _, err = run_inference(capsys, "--run", str(trained_run), "--checkpoint", "step_7")
    assert code == 2
    assert "no checkpoint 'step_7'" in err and "best, last, step_30, step_20, step_10" in err


def test_prompt_file_is_read_and_a_missing_one_reported(exported_run, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("to be, or", encoding="utf-8")
    code, out, _ = run_inference(capsys, "--run", str(exported_run), "--prompt-file",
                                 str(prompt), "--max-new-tokens", "5", "--seed", "1")
    assert code == 0 and out.startswith("to be, or") and len(out) == len("to be, or") + 6
    code, _, err = run_inference(capsys, "--run", str(exported_run), "--prompt-file",
                                 str(tmp_path / "none.txt"))
    assert code == 2 and "cannot read --prompt-file" in err


def test_sampling_flags_reach_the_sampler(exported_run, capsys):
    """top-k 1 at any temperature is greedy; a huge repetition penalty changes greedy text."""
    base = ["--run", str(exported_run), "--max-new-tokens", "40", "--prompt", "a"]
    greedy = run_inference(capsys, *base, "--temperature", "0")[1]
    assert run_inference(capsys, *base, "--temperature", "1.5", "--top-k", "1",
                         "--seed", "9")[1] == greedy
    assert run_inference(capsys, *base, "--temperature", "1.0", "--min-p", "1.0",
                         "--seed", "9")[1] == greedy
    assert run_inference(capsys, *base, "--temperature", "0",
                         "--repetition-penalty", "1000")[1] != greedy


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--quantize", "int8"],
                                   ["--quantize", "int8-dynamic"]],
                         ids=["bfloat16", "int8", "int8-dynamic"])
def test_smaller_cpu_weights_generate_text_of_the_vocabulary(exported_run, capsys, flags):
    """On a CPU, --dtype bfloat16 and --quantize int8 store the decode weights smaller; the
    model and the sampling are otherwise the same."""
    base = ["--run", str(exported_run), "--max-new-tokens", "30", "--prompt", "ab",
            "--device", "cpu", "--seed", "3"]
    code, out, err = run_inference(capsys, *base, *flags)
    assert code == 0, err
    assert out.startswith("ab") and len(out) == 2 + 30 + 1
    assert set(out) <= set(VOCAB)
    assert "decode" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(("flag", "message"), [
    ("--compile", "--compile compiles decoding on a CPU, not cuda; drop it, or pass --device cpu"),
    ("--quantize=int8", "--quantize int8 is for decoding on a CPU, not cuda; drop it"),
])
def test_cpu_only_decoding_flags_are_refused_on_a_gpu(exported_run, capsys, monkeypatch, flag,
                                                      message):
    """Checked before the run is loaded, so a machine without a GPU can stand in for one."""
    monkeypatch.setattr(inference, "resolve_device", lambda name: torch.device("cuda"))
    code, out, err = run_inference(capsys, "--run", str(exported_run), flag)
    assert code == 2 and out == ""
    assert err.strip().startswith(f"error: {message}")


def test_compiled_cpu_decoding_writes_the_eager_text(exported_run, capsys):
    """Sampled with a seed, --compile writes the text the eager model writes (greedy tokens
    are pinned for compiled steps in tests/test_decoding.py)."""
    base = ["--run", str(exported_run), "--max-new-tokens", "40", "--prompt", "ab",
            "--device", "cpu", "--seed", "3"]
    code, eager, err = run_inference(capsys, *base)
    assert code == 0, err
    code, compiled, err = run_inference(capsys, *base, "--compile")
    assert code == 0, err
    assert compiled == eager
    assert re.search(r"compiled the decode step in \d+\.\d s", err)


@pytest.mark.parametrize("flags", [["--compile"], ["--quantize", "int8"],
                                   ["--quantize", "int8-dynamic"]],
                         ids=["compile", "int8", "int8-dynamic"])
def test_compile_and_quantize_decode_the_portable_way_on_an_untested_torch(
        exported_run, capsys, monkeypatch, flags):
    """On a torch the private calls were not tested with (utils/private_torch.py), --compile
    and --quantize say so in one line and write the plain float32 model's greedy text."""
    base = ["--run", str(exported_run), "--max-new-tokens", "40", "--prompt", "ab",
            "--device", "cpu", "--temperature", "0"]
    code, plain, err = run_inference(capsys, *base)
    assert code == 0, err
    monkeypatch.setattr(private_torch, "TESTED_TORCH_RELEASES", ("1.0",))
    code, out, err = run_inference(capsys, *base, *flags)
    assert code == 0, err
    assert out == plain
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "Traceback" not in err
    assert (f"tested with torch 1.0 only, and this is torch {torch.__version__}; decoding on "
            "the portable path (eager, float32 weights)") in warnings[0]
    assert "compiled the decode step" not in err


@pytest.mark.parametrize("faster", ["F.linear", "transposed"])
def test_cpu_float32_decoding_keeps_the_faster_layout(exported_run, monkeypatch, faster):
    """Which float32 layout decodes faster depends on the CPU, so inference.py times both."""
    model, _ = load_export(exported_run / "artifacts" / "export")

    def fake_seconds(candidate: LanguageModel, batch_size: int) -> float:
        is_transposed = any(isinstance(m, DecodeLinear) for m in candidate.modules())
        return 1.0 if is_transposed == (faster == "transposed") else 2.0

    monkeypatch.setattr(decoding, "decode_step_seconds", fake_seconds)
    chosen = decoding.cpu_decoder(model, "float32", batch_size=1).model
    assert any(isinstance(m, DecodeLinear) for m in chosen.modules()) == (faster == "transposed")


def test_decode_step_timing_fits_a_one_character_window(exported_run):
    model, _ = load_export(exported_run / "artifacts" / "export")
    model = LanguageModel(dataclasses.replace(model.config, block_size=1)).eval()
    assert decoding.decode_step_seconds(model, batch_size=2) > 0
