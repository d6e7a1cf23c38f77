"""The time budget: the calibration that turns seconds into max_iters, the pace checks that
fit it anew, and a budgeted run that records a max_iters which repeats it."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import pytest

import train
from tests.conftest import cpu_setup, final_hparams, find_aim_run
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
from utils.config import TrainConfig
from utils.optimizers import lr_factor
from utils.runs import RunPaths
from utils.tracking import Tracker
from utils.training import init_state, optimizer_step

# a model small enough for a budget of a few seconds to hold several evaluations
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "48", "--block-size", "32",
        "--batch-size", "16", "--eval-iters", "10", "--sample-tokens", "50", "--device", "cpu"]


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
    code = train.main([*flags, "--time-budget", "3", "--aim", "--aim-repo",
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
    assert (saved["max_iters"], saved["time_budget"]) == (max_iters, 3.0)
    assert f"finished {max_iters} steps" in budgeted
    assert final_hparams(run_dir)["max_iters"] == max_iters
    assert find_aim_run(tmp_path / "aim", run_dir.name)["hparams"]["max_iters"] == max_iters

    code = train.main([*flags, "--max-iters", str(max_iters), "--runs-dir", str(runs / "steps")])
    assert code == 0, capsys.readouterr().err
    (repeat_dir,) = (runs / "steps").iterdir()
    for name in ("model.safetensors",):
        first = (run_dir / "artifacts" / "export" / name).read_bytes()
        assert first == (repeat_dir / "artifacts" / "export" / name).read_bytes()


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
