"""train.py end to end through its CLI, plus the schedule and the training step."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from model import LanguageModel, ModelConfig
from tests.conftest import (
    OPTION_SETS,
    PROJECT_ROOT,
    cpu_setup,
    run_script,
    state_for,
)
from utils.checkpoint import load_export
from utils.config import TrainConfig
from utils.optimizers import MuonWithAdamW, build_optimizer, lr_at, lr_factor
from utils.runs import RunPaths
from utils.training import (
    estimate_loss,
    full_split_loss,
    full_split_windows,
    init_state,
    optimizer_step,
    sample_text,
)

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "48", "--block-size", "32",
        "--batch-size", "16", "--eval-iters", "10", "--sample-tokens", "50", "--device", "cpu"]


def test_tiny_training_run_learns_exports_and_fills_its_run_folder(tmp_path):
    runs = tmp_path / "runs"
    # the end-of-run full-split score is capped: this test reads the evaluations' losses
    result = run_script("train.py", *TINY, "--max-iters", "300", "--eval-interval", "150",
                        "--learning-rate", "3e-3", "--run-tag", "e2e", "--runs-dir", str(runs),
                        "--full-split-max-tokens", "3200")
    assert result.returncode == 0, result.stderr
    run_dir = Path(re.search(r"run folder: (\S+)", result.stdout).group(1))
    assert run_dir.parent == runs and run_dir.name.endswith("_e2e")
    for name in ("artifacts/export/model.safetensors", "artifacts/export/config.json",
                 "artifacts/export/tokenizer.json", "meta/git.txt", "meta/env.txt",
                 "meta/full_config.json", "meta/command.txt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "artifacts" / "checkpoints").is_dir()

    # how long the steps took, evaluations left out: the figure time-to-quality is read in
    assert re.search(r"training ended at step 300: finished 300 steps \(\d+\.\ds of steps, "
                     r"evaluations left out\)", result.stderr), result.stderr[-2000:]

    # meta/results.json: what the run achieved, in nats and bits per character
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    full = float(re.search(r"full-split val loss (\d+\.\d+)", result.stdout).group(1))
    assert results["full_split_val_loss"] == pytest.approx(full, abs=1e-4)
    assert results["full_split_val_bpc"] == pytest.approx(results["full_split_val_loss"]
                                                          / math.log(2))
    assert f"{results['full_split_val_bpc']:.3f} bits per character" in result.stdout
    assert (results["steps"], results["end_reason"]) == (300, "finished 300 steps")
    assert results["tokens"] == 300 * 16 * 32 and results["training_seconds"] > 0
    assert results["full_split_val_tokens"] == 3200

    final_val = float(re.search(r"val loss (\d+\.\d+)", result.stdout).group(1))
    vocab_size = len(set((PROJECT_ROOT / "input.txt").read_text(encoding="utf-8")))
    assert final_val < math.log(vocab_size) - 1.2

    # the export is the trained model: it reproduces the reported val loss on the same batches
    model, tokenizer = load_export(run_dir / "artifacts" / "export")
    config = json.loads((run_dir / "meta" / "full_config.json").read_text())
    cfg = TrainConfig(**config["train"])
    ids = torch.tensor(tokenizer.encode((PROJECT_ROOT / "input.txt").read_text()))
    losses = estimate_loss(model, cpu_setup(model.config, cfg, ids, tokenizer))
    assert losses["val"] == pytest.approx(final_val, abs=1e-4)
    assert config["model"]["vocab_size"] == vocab_size

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpc", "val/bpc_full", "lr", "tokens_per_sec"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [150, 300]


def test_missing_data_file_exits_2_and_creates_no_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = train.main(["--data-path", str(tmp_path / "nope.txt"), "--runs-dir", str(runs)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: data file {tmp_path / 'nope.txt'} does not exist; pass --data-path a text "
        "file, a folder of .txt files, a glob or a .jsonl file"]
    assert not runs.exists()


def test_ctrl_c_stops_training_and_still_exports(tmp_path):
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *TINY, "--max-iters", "100000",
         "--checkpoint-interval", "20", "--runs-dir", str(runs)], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # the first checkpoint: the run is past its setup and has taken steps
    while not list(runs.glob("*/artifacts/checkpoints/step_20.safetensors")):
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "SIGINT received: stopping after this step" in err and "Traceback" not in err
    assert "stopped by SIGINT at step" in err
    (run_dir,) = runs.iterdir()
    load_export(run_dir / "artifacts" / "export")
    assert f"run folder: {run_dir}" in out
    results = json.loads((run_dir / "meta" / "results.json").read_text())
    assert results["end_reason"] == "stopped by SIGINT" and results["steps"] >= 20
    assert results["full_split_val_loss"] is None  # a stopped run skips the full-split pass


def test_lr_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(schedule="cosine", learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                      max_iters=110)
    warmup = [lr_at(s, cfg) for s in range(10)]
    assert warmup == sorted(warmup) and warmup[-1] < 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(0.1)


def test_wsd_warms_up_holds_then_decays_linearly_over_the_last_fraction():
    cfg = TrainConfig(schedule="wsd", learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                      max_iters=110, decay_fraction=0.4)  # decay over steps 66..110
    assert lr_factor(5, cfg) < 1.0
    assert lr_factor(10, cfg) == lr_factor(65, cfg) == lr_factor(66, cfg) == 1.0
    assert lr_factor(88, cfg) == pytest.approx(0.55)  # halfway down the linear decay
    assert lr_factor(110, cfg) == lr_factor(200, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_option_trains_and_the_loss_falls(tiny_config, options, optimizer):
    config = ModelConfig(**{**vars(tiny_config), **options})
    cfg = TrainConfig(optimizer=optimizer, batch_size=8, max_iters=40, warmup_iters=5)
    setup = cpu_setup(config, cfg)
    state = init_state(setup)
    losses = []
    for _ in range(cfg.max_iters):
        losses.append(optimizer_step(state, setup).loss.item())
        state.scheduler.step()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tiny_config):
    model = LanguageModel(tiny_config)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer.parts
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon == {n for n in names.values() if n.startswith("blocks.") and
                       n.endswith("weight") and "ln_" not in n}
    assert in_adamw == set(names.values()) - in_muon
    assert {"token_embedding.weight", "lm_head.weight"} <= in_adamw


def test_embeddings_and_head_follow_their_own_learning_rates_and_the_schedule(tiny_config):
    model = LanguageModel(dataclasses.replace(tiny_config, position="learned"))
    names = {id(p): name for name, p in model.named_parameters()}
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, embedding_lr=0.3, head_lr=2e-3,
                      warmup_iters=0, schedule="cosine", max_iters=10)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    for _ in range(5):
        optimizer.step()  # no gradients: moves nothing
        scheduler.step()
    peak = {names[id(p)]: group["initial_lr"] for group in optimizer.param_groups
            for p in group["params"]}
    assert peak["token_embedding.weight"] == peak["position_embedding.weight"] == 0.3
    assert peak["lm_head.weight"] == 2e-3 and peak["blocks.0.mlp.fc.weight"] == cfg.muon_lr
    for group in optimizer.param_groups:  # every group at the same fraction of its peak
        assert group["lr"] == pytest.approx(group["initial_lr"] * lr_factor(5, cfg))
    # unset, they are learning_rate, in the two AdamW groups checkpoints have always held
    plain = build_optimizer(model, TrainConfig(optimizer="adamw", embedding_lr=None),
                            torch.device("cpu"))
    # (matrices, gains and biases): this model has no gains or biases
    assert [len(group["params"]) > 0 for group in plain.param_groups] == [True, False]
    assert {group["lr"] for group in plain.param_groups} == {TrainConfig().learning_rate}
    assert TrainConfig().embedding_lr == 0.3  # the default run's, tuned in BENCHMARKS.md


def test_full_split_loss_averages_every_non_overlapping_window(tiny_config):
    setup = cpu_setup(tiny_config, TrainConfig(batch_size=3),
                      ids=torch.randint(tiny_config.vocab_size, (2000,)))
    model = LanguageModel(tiny_config)
    val, block = torch.from_numpy(setup.splits.val.astype(np.int64)), tiny_config.block_size
    windows = [(val[i:i + block], val[i + 1:i + block + 1])
               for i in range(0, len(val) - block, block)]
    expected = sum(model(x[None], y[None])[1].item() for x, y in windows) / len(windows)
    assert full_split_loss(model, setup) == pytest.approx(expected, abs=1e-5)


def test_a_capped_full_split_pass_scores_the_first_windows_and_says_so(tiny_config, tmp_path,
                                                                      capsys):
    """full_split_max_tokens keeps the pass short on a large corpus: it scores the split's
    first windows, and the report names how much of the split that was."""
    cfg = TrainConfig(batch_size=3, full_split_max_tokens=100, sample_tokens=0)
    setup = cpu_setup(tiny_config, cfg, ids=torch.randint(tiny_config.vocab_size, (2000,)))
    model = LanguageModel(tiny_config)
    val, block = torch.from_numpy(setup.splits.val.astype(np.int64)), tiny_config.block_size
    windows = [(val[i:i + block], val[i + 1:i + block + 1]) for i in range(0, 6 * block, block)]
    expected = sum(model(x[None], y[None])[1].item() for x, y in windows) / len(windows)
    assert full_split_windows(setup) == 100 // block == 6
    assert full_split_loss(model, setup) == pytest.approx(expected, abs=1e-5)
    state = state_for(model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    state.last_losses = {"train": 1.0, "val": 2.0, "val_full": 3.0}
    train.report(RunPaths(tmp_path), state, setup, [])
    assert (f"full-split val loss 3.0000 (first 96 of {len(val)} val tokens)"
            in capsys.readouterr().out)


def test_the_report_shows_the_last_evaluations_sample_of_the_same_weights(tiny_config, tmp_path,
                                                                          capsys):
    """The end of a run prints the sample its last evaluation made of the same weights; after
    further steps (a stop between evaluations) it samples the weights anew."""
    cfg = TrainConfig(batch_size=3, sample_tokens=20)
    setup = cpu_setup(tiny_config, cfg, ids=torch.randint(tiny_config.vocab_size, (2000,)))
    model = LanguageModel(tiny_config)
    state = state_for(model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    state.step, state.last_sample = 40, (40, "THE LAST EVALUATION'S SAMPLE")
    train.report(RunPaths(tmp_path), state, setup, [])
    assert "--- sample ---\nTHE LAST EVALUATION'S SAMPLE\n" in capsys.readouterr().out
    state.step = 41
    train.report(RunPaths(tmp_path), state, setup, [])
    fresh = sample_text(model, setup, cfg.sample_tokens)
    assert f"--- sample ---\n{fresh}\n" in capsys.readouterr().out


def test_eval_full_scores_the_whole_val_split_and_every_run_reports_it(tmp_path, capsys):
    code = train.main([*TINY, "--max-iters", "40", "--eval-interval", "20", "--eval-full",
                       "--runs-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"step 20: train loss \d+\.\d+, val loss \d+\.\d+ \(full split\)", err)
    # the last evaluation and the end-of-run score see the same model and the same windows
    last = re.search(r"step 40: train loss [\d.]+, val loss ([\d.]+)", err).group(1)
    final = re.search(r"val loss [\d.]+, full-split val loss ([\d.]+)", out)
    assert final.group(1) == last


class FixedBatches:
    """Hands out prepared (x, y) batches in order, in place of a BatchSampler."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def test_grad_accumulation_matches_one_large_batch():
    config = ModelConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16,
                         dropout=0.0)
    x, y = torch.randint(13, (8, 8)), torch.randint(13, (8, 8))
    weights = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:4], y[:4]), (x[4:], y[4:])])):
        torch.manual_seed(0)
        model = LanguageModel(config)
        cfg = TrainConfig(grad_accum_steps=accum, batch_size=8 // accum)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        state = state_for(model, optimizer, FixedBatches(batches))
        result = optimizer_step(state, cpu_setup(config, cfg))
        weights.append((result.loss.item(), model.blocks[0].mlp.fc.weight.detach().clone()))
    assert weights[0][0] == pytest.approx(weights[1][0], abs=1e-6)
    torch.testing.assert_close(weights[0][1], weights[1][1], atol=1e-6, rtol=0)


def test_weight_decay_applies_to_matrices_only():
    model = LanguageModel(ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4,
                                      bias=True))
    optimizer = build_optimizer(
        model, TrainConfig(optimizer="adamw", weight_decay=0.3, embedding_lr=None),
        torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])


def test_bf16_autocast_reaches_the_float32_val_loss(tmp_path, capsys):
    """bf16 is the default on CUDA only because it learns as well: a few hundred steps in each
    precision end within 0.02 of each other (run here on CPU, the same bf16 autocast rules,
    where they end far closer than that). A given peak FLOP/s skips timing bf16 matmuls, which
    are slow on a CPU without native bf16; a cap shortens the end-of-run full-split score,
    which nothing here reads."""
    import train

    losses = {}
    for dtype in ("float32", "bfloat16"):
        code = train.main([*TINY, "--max-iters", "150", "--eval-interval", "150",
                           "--eval-iters", "20", "--learning-rate", "3e-3", "--dtype", dtype,
                           "--peak-flops", "1e12", "--full-split-max-tokens", "3200",
                           "--runs-dir", str(tmp_path / dtype)])
        out = capsys.readouterr().out
        assert code == 0
        losses[dtype] = float(re.search(r"val loss (\d+\.\d+)", out).group(1))
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.02, losses


def test_a_second_ctrl_c_quits_at_once(tmp_path, capsys, monkeypatch):
    """Both signals arrive during step 5 (sent by the process to itself; Python runs the handler
    at once): the first asks for a graceful stop, the second quits without the final export."""
    import os

    import train

    real_step = train.optimizer_step
    calls = {"n": 0}

    def step_with_two_interrupts(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", step_with_two_interrupts)
    # whatever was there before (SIG_IGN when started in the background by a script)
    handler_before = signal.getsignal(signal.SIGINT)
    code = train.main([*TINY, "--max-iters", "100", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130
    assert "SIGINT received: stopping after this step" in err
    assert "interrupted again: quitting at once" in err
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "artifacts" / "export" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
