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
    final_hparams,
    find_aim_run,
    run_script,
    state_for,
)
from utils import budget
from utils.budget import (
    CALIBRATION_SECONDS,
    PACE_CHECK_MARGIN,
    PACE_CHECK_SHARES,
    SAFETY_MARGIN,
    LoopClock,
    PaceCheck,
    Plan,
    Timings,
    calibration_seconds,
    plan_pace_check,
    refit_max_iters,
    shortest_run_keeping,
    steps_within,
)
from utils.checkpoint import load_export
from utils.config import TrainConfig
from utils.optimizers import MuonWithAdamW, build_optimizer, lr_at, lr_factor
from utils.runs import RunPaths
from utils.tracking import Tracker
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
    result = run_script("train.py", *TINY, "--max-iters", "300", "--eval-interval", "150",
                        "--learning-rate", "3e-3", "--run-tag", "e2e", "--runs-dir", str(runs))
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
    assert {"train/loss", "val/loss", "lr", "tokens_per_sec"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [150, 300]


def test_missing_data_file_exits_2_and_creates_no_run(tmp_path):
    runs = tmp_path / "runs"
    result = run_script("train.py", "--data-path", str(tmp_path / "nope.txt"),
                        "--runs-dir", str(runs))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
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
    train.report(RunPaths(tmp_path), state, setup)
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
    train.report(RunPaths(tmp_path), state, setup)
    assert "--- sample ---\nTHE LAST EVALUATION'S SAMPLE\n" in capsys.readouterr().out
    state.step = 41
    train.report(RunPaths(tmp_path), state, setup)
    fresh = sample_text(model, setup, cfg.sample_tokens)
    assert f"--- sample ---\n{fresh}\n" in capsys.readouterr().out


def test_the_budget_fits_steps_evaluations_and_the_end():
    timings = Timings(step=0.1, evaluation=2.0, end=3.0)
    steps = steps_within(100.0, timings, eval_interval=50)
    evaluations = math.ceil(steps / 50)
    spent = steps * 0.1 + evaluations * 2.0 + 3.0
    usable = 100.0 * (1 - SAFETY_MARGIN)
    assert spent <= usable < spent + 0.1 + 2.0 + 1e-9  # one more step would not fit


def test_a_pace_check_keeps_a_smaller_margin_than_the_calibration():
    """After minutes of timed steps the rest of the run keeps PACE_CHECK_MARGIN, not the
    calibration's SAFETY_MARGIN: the same seconds left fit more steps."""
    assert PACE_CHECK_MARGIN < SAFETY_MARGIN
    cfg = TrainConfig(schedule="wsd", max_iters=1000, decay_fraction=0.6, warmup_iters=20,
                      eval_interval=50)
    timings = Timings(step=0.1, evaluation=2.0, end=3.0)
    check = PaceCheck(step=300, deadline=0.0, timings=timings)
    max_iters = refit_max_iters(300, 0.1, 100.0, check, cfg)
    assert max_iters == 300 + steps_within(100.0, timings, 50, margin=PACE_CHECK_MARGIN)
    assert max_iters > 300 + steps_within(100.0, timings, 50)


def test_calibration_takes_a_small_share_of_a_short_budget():
    assert calibration_seconds(240.0) == CALIBRATION_SECONDS
    assert calibration_seconds(12.0) == pytest.approx(0.6)  # not a quarter of a 12-s run


def test_pace_checks_come_late_in_the_constant_phase_of_wsd_only():
    cfg = TrainConfig(schedule="wsd", max_iters=1000, decay_fraction=0.6, warmup_iters=20)
    timings = Timings(step=0.1, evaluation=1.0, end=2.0)
    first = plan_pace_check(cfg, PACE_CHECK_SHARES, 0, 0.0, timings)
    assert first.step == 300  # 3/4 of the way to the decay at step 400
    assert first.following(cfg, 300).step == 380  # and just before it
    assert first.following(cfg, 300).following(cfg, 380) is None
    # the second check is placed in the schedule the first one left, and comes only once
    longer = dataclasses.replace(cfg, max_iters=2000)
    assert first.following(longer, 300).step == 760
    assert first.following(longer, 300).following(longer, 760) is None
    for other in (dataclasses.replace(cfg, schedule="cosine"),
                  dataclasses.replace(cfg, lr_decay_iters=800)):
        assert plan_pace_check(other, PACE_CHECK_SHARES, 0, 0.0, timings) is None


@pytest.mark.parametrize("seconds_left", [0.0, 30.0, 1000.0])
def test_a_new_max_iters_keeps_every_learning_rate_already_used(seconds_left):
    cfg = TrainConfig(schedule="wsd", max_iters=1000, decay_fraction=0.6, warmup_iters=20)
    check = PaceCheck(step=300, deadline=0.0, timings=Timings(step=0.1, evaluation=1.0, end=2.0))
    max_iters = refit_max_iters(300, 0.1, seconds_left, check, cfg)
    refit = dataclasses.replace(cfg, max_iters=max_iters)
    # the scheduler has set the rate of step 300 already
    assert [lr_factor(s, refit) for s in range(301)] == [lr_factor(s, cfg) for s in range(301)]
    if seconds_left == 0.0:  # no time left: the shortest run still constant at step 300
        assert max_iters == shortest_run_keeping(300, cfg) == 752  # decays from 752 - 451
    if seconds_left == 1000.0:  # time for more steps than the calibration allowed
        assert max_iters > cfg.max_iters


def test_the_pace_check_lengthens_the_run_and_records_it(tiny_config, tmp_path):
    cfg = TrainConfig(batch_size=4, max_iters=40, warmup_iters=2, decay_fraction=0.5,
                      eval_interval=1000)
    setup = cpu_setup(tiny_config, cfg)
    state = init_state(setup)
    run = RunPaths(tmp_path)
    run.meta.mkdir()
    for _ in range(15):
        optimizer_step(state, setup)
        state.scheduler.step()
        state.step += 1
    group = state.optimizer.param_groups[0]
    rate = group["lr"]
    # steps of 1 s so far and 60 s left: about 54 more, where the calibration allowed 25
    clock = LoopClock(0)
    clock.started -= 15.0
    check = PaceCheck(step=15, deadline=time.perf_counter() + 60.0,
                      timings=Timings(step=1.0, evaluation=0.0, end=0.0))
    texts = []
    recorder = type("Recorder", (), {"log_text": lambda self, *logged: texts.append(logged)})
    plan = Plan(setup, check)
    budget.check_pace(state, plan, clock, run, Tracker([recorder()]))
    max_iters = plan.setup.config.train.max_iters
    assert 60 < max_iters < 75
    # the trackers keep the check's line at its step
    ((name, message, step),) = texts
    assert (name, step) == ("pace_check", 15)
    assert re.fullmatch(rf"pace check at step 15: 100\d\.\d ms per step -> max_iters={max_iters} "
                        rf"\(--max-iters {max_iters} repeats this run\)", message)
    assert group["lr"] == rate  # the rate of the step about to run is unchanged
    saved = json.loads((run.meta / "full_config.json").read_text())["train"]
    assert saved["max_iters"] == max_iters
    for step in range(15, max_iters):  # the rest follows the schedule of the new length
        assert group["lr"] == pytest.approx(group["initial_lr"]
                                            * lr_factor(step, plan.setup.config.train))
        optimizer_step(state, plan.setup)
        state.scheduler.step()
        state.step += 1
    assert group["lr"] == 0.0  # the decay ends with the run


@pytest.mark.parametrize(("compile_model", "evaluation_s"), [(False, 30.0), (True, 1.0)])
def test_a_compiled_run_budgets_its_evaluations_by_a_compiled_one(
        tiny_config, monkeypatch, compile_model, evaluation_s):
    """The first evaluation of a compiled model compiles its graph, once: the calibration
    times the next one. A fake clock moves only in the evaluations: 30 s for the first, 1 s
    after."""
    cfg = TrainConfig(batch_size=4, eval_iters=2, sample_tokens=0, time_budget=10.0)
    state = init_state(cpu_setup(tiny_config, cfg))  # eager steps: nothing compiles
    setup = cpu_setup(tiny_config, dataclasses.replace(cfg, compile=compile_model))
    now, calls = [0.0], []
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])

    def fake_evaluation(model, setup):
        calls.append(model)
        now[0] += 30.0 if len(calls) == 1 else 1.0
        return {"train": 1.0, "val": 1.0}

    monkeypatch.setattr(budget, "estimate_loss", fake_evaluation)
    timings = budget.measure_timings(state, setup)
    assert timings.evaluation == pytest.approx(evaluation_s)


def test_a_time_budget_becomes_a_recorded_max_iters_that_repeats_the_run(tmp_path, capsys):
    """The budget's max_iters, as the pace check leaves it, is recorded (in full_config.json
    and both trackers' hyperparameters) and repeats the run. Both runs are in process, as the
    command line runs them, and cap the end-of-run full-split score, which nothing here reads."""
    runs = tmp_path / "runs"
    flags = [*TINY, "--eval-interval", "20", "--warmup-iters", "2",
             "--full-split-max-tokens", "3200"]
    code = train.main([*flags, "--time-budget", "6", "--aim", "--aim-repo",
                       str(tmp_path / "aim"), "--runs-dir", str(runs / "budget")])
    budgeted = capsys.readouterr().err
    assert code == 0, budgeted
    calibrated = int(re.search(r"time budget .* -> max_iters=(\d+) \(--max-iters \1 repeats",
                               budgeted).group(1))
    checks = re.findall(r"pace check at step \d+: .* -> max_iters=(\d+) \(--max-iters \1 "
                        r"repeats", budgeted)
    # a run the calibration made long enough checks its pace once or twice (the second is
    # skipped if the first shortened the run a lot); a busy machine can leave it too short
    first = plan_pace_check(TrainConfig(max_iters=calibrated, warmup_iters=2),
                            PACE_CHECK_SHARES, 0, 0.0, Timings(0.0, 0.0, 0.0))
    assert (1 <= len(checks) <= 2) if first is not None else not checks
    max_iters = int(checks[-1]) if checks else calibrated
    (run_dir,) = (runs / "budget").iterdir()
    saved = json.loads((run_dir / "meta" / "full_config.json").read_text())["train"]
    assert (saved["max_iters"], saved["time_budget"]) == (max_iters, 6.0)
    assert f"finished {max_iters} steps" in budgeted
    assert final_hparams(run_dir)["max_iters"] == max_iters
    assert find_aim_run(tmp_path / "aim", run_dir.name)["hparams"]["max_iters"] == max_iters

    code = train.main([*flags, "--max-iters", str(max_iters), "--runs-dir", str(runs / "steps")])
    assert code == 0, capsys.readouterr().err
    (repeat_dir,) = (runs / "steps").iterdir()
    for name in ("model.safetensors",):
        first = (run_dir / "artifacts" / "export" / name).read_bytes()
        assert first == (repeat_dir / "artifacts" / "export" / name).read_bytes()


def test_eval_full_scores_the_whole_val_split_and_every_run_reports_it(tmp_path):
    result = run_script("train.py", *TINY, "--max-iters", "40", "--eval-interval", "20",
                        "--eval-full", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"step 20: train loss \d+\.\d+, val loss \d+\.\d+ \(full split\)",
                     result.stderr)
    # the last evaluation and the end-of-run score see the same model and the same windows
    last = re.search(r"step 40: train loss [\d.]+, val loss ([\d.]+)", result.stderr).group(1)
    final = re.search(r"val loss [\d.]+, full-split val loss ([\d.]+)", result.stdout)
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


def test_the_loop_clock_leaves_paused_time_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = LoopClock(first_step=10)
    now[0] = 103.0
    with clock.pause():  # an evaluation
        now[0] = 110.0
    now[0] = 112.0
    assert clock.training_seconds() == 5.0
    assert clock.seconds_per_step(20) == 0.5


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
