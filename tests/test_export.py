"""export.py: a Hugging Face transformers folder that computes what chargpt computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import export
import inference
import train
from model import CLASSIC_ARCHITECTURE, LanguageModel, ModelConfig
from tests.conftest import PROJECT_ROOT, randomised, run_script
from tokenizer import CharTokenizer
from utils.checkpoint import load_checkpoint_model, save_export
from utils.runs import RunPaths

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\tSpeak, speak. é☃"
TOKENIZER = CharTokenizer.from_text(TEXT)
BASE = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=24, n_layer=2, n_head=2,
                   n_embd=16)

# each set maps onto one class exactly; the variations are the options that class also covers
EXPORTABLE = {
    "nanochat (default)": {},
    "nanochat, tied, gelu, no softcap": {"tie_embeddings": True, "mlp": "gelu",
                                         "logit_softcap": None},
    "gpt2 (classic)": CLASSIC_ARCHITECTURE,
    "gpt2 with biases": {**CLASSIC_ARCHITECTURE, "bias": True},
    "gpt2 untied": {**CLASSIC_ARCHITECTURE, "tie_embeddings": False},
}


def exported(options: dict, tmp_path, seed: int = 0):
    model = randomised(LanguageModel(dataclasses.replace(BASE, **options)), seed).eval()
    export.export(model, TOKENIZER, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return model, hf


@pytest.mark.parametrize("options", EXPORTABLE.values(), ids=EXPORTABLE.keys())
def test_transformers_gives_chargpts_logits(options, tmp_path):
    model, hf = exported(options, tmp_path)
    expected_class = "GPT2LMHeadModel" if options.get("position") == "learned" else \
        "NanoChatForCausalLM"
    assert type(hf).__name__ == expected_class
    ids = torch.randint(BASE.vocab_size, (3, BASE.block_size), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_the_tokenizer_round_trips_text_of_the_vocabulary(tmp_path):
    exported({}, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, "\n\n", " speak  speak ", "é☃\t\n", TEXT[::-1]):
        ids = tokenizer(text)["input_ids"]
        assert ids == TOKENIZER.encode(text)
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("options", [{}, CLASSIC_ARCHITECTURE], ids=["nanochat", "gpt2"])
def test_greedy_generation_matches_inference_py(options, tmp_path, capsys):
    model, hf = exported(options, tmp_path, seed=3)
    run = RunPaths(tmp_path / "run")
    save_export(run.export, model, TOKENIZER)
    prompt, new = "First", 16
    assert inference.main(["--run", str(run.root), "--prompt", prompt, "--temperature", "0",
                           "--max-new-tokens", str(new), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    ours = printed[:-1]  # the one newline inference.py ends with; the text may end in more
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new)
    assert tokenizer.decode(output[0]) == ours


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "layernorm"}, r"cannot export norm=layernorm: with position=rope the model "
                                r"maps onto NanoChatForCausalLM, which has only RMSNorm; only "
                                r"GPT-2's and NanoChat's option sets export exactly"),
        ({"qk_norm": False}, r"cannot export qk_norm=False: .* which has always QK-norm"),
        ({"bias": True}, r"cannot export bias=True: .* no biases in its MLP"),
        ({**CLASSIC_ARCHITECTURE, "logit_softcap": 15.0},
         r"cannot export logit_softcap=15.0: with position=learned the model maps onto "
         r"GPT2LMHeadModel, which has no logit softcap"),
        ({**CLASSIC_ARCHITECTURE, "mlp": "relu2"}, r"cannot export mlp=relu2: .* only GELU"),
    ],
    ids=["rope-with-layernorm", "no-qk-norm", "nanochat-bias", "gpt2-softcap", "gpt2-relu2"],
)
def test_options_without_an_exact_layout_are_refused(options, message):
    with pytest.raises(export.UserError, match=message):
        export.layout_for(dataclasses.replace(BASE, **options))


def test_the_command_line_exports_a_run_and_refuses_in_one_line(tmp_path, capsys):
    run = RunPaths(tmp_path / "runs" / "20260101_000000_mine")
    save_export(run.export, randomised(LanguageModel(BASE)), TOKENIZER)
    result = run_script("export.py", "--run", "latest", "--runs-dir", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    odd = RunPaths(tmp_path / "odd")
    save_export(odd.export, LanguageModel(dataclasses.replace(BASE, norm="layernorm")),
                TOKENIZER)
    # in process, as the command line runs it: export.main prints the error and returns the code
    assert export.main(["--run", str(odd.root), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot export norm=layernorm: with position=rope the model maps onto "
        "NanoChatForCausalLM, which has only RMSNorm; only GPT-2's and NanoChat's option sets "
        "export exactly"]
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_exports_as_well_as_the_final_weights(tmp_path, corpus_file, capsys):
    """--checkpoint NAME exports that checkpoint's weights, here of a classic-preset run; both
    scripts run in process (the test above runs the command line itself)."""
    runs = tmp_path / "runs"
    assert train.main(["--config", str(PROJECT_ROOT / "configs" / "presets" / "classic.yaml"),
                       "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                       "--data-path", str(corpus_file), "--max-iters", "6",
                       "--checkpoint-interval", "3", "--eval-iters", "2", "--sample-tokens",
                       "0", "--no-aim", "--runs-dir", str(runs)]) == 0
    (run,) = runs.iterdir()
    assert export.main(["--run", str(run), "--checkpoint", "step_3",
                        "--out", str(tmp_path / "hf")]) == 0
    assert "as GPT2LMHeadModel" in capsys.readouterr().err
    model, _ = load_checkpoint_model(run / "artifacts" / "checkpoints" / "step_3.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(model.config.vocab_size, (2, model.config.block_size))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-5
