"""Config layering (defaults < ./config.json < --config < env < flags) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train
from model import ModelConfig
from tests.conftest import PROJECT_ROOT
from utils.config import TrainConfig
from utils.config_loader import ConfigError, ConfigLoader


def make_loader(tmp_path: Path, env: dict[str, str] | None = None,
                config_json: dict | None = None) -> ConfigLoader:
    """A loader whose current folder holds config.json (the file layer under --config)."""
    values = {"batch_size": 7, "n_layer": 3} if config_json is None else config_json
    (tmp_path / "config.json").write_text(json.dumps(values))
    return ConfigLoader(cwd=tmp_path, environ=env or {})


def load(loader: ConfigLoader, *argv: str):
    return loader.load(loader.build_parser().parse_args(list(argv)))


def test_the_dataclass_defaults_are_the_default_run(tmp_path):
    config = ConfigLoader(cwd=tmp_path, environ={}).load(
        ConfigLoader(cwd=tmp_path, environ={}).build_parser().parse_args([]))
    assert config.train == TrainConfig()
    assert config.model == ModelConfig()
    assert (config.model.n_layer, config.model.n_embd, config.train.batch_size) == (4, 128, 32)
    assert config.train.time_budget == 280.0


def test_max_iters_at_a_higher_layer_switches_the_default_budget_off(tmp_path):
    loader = make_loader(tmp_path, config_json={})
    assert load(loader).train.time_budget == 280.0
    config = load(loader, "--max-iters", "200")
    assert (config.train.max_iters, config.train.time_budget) == (200, None)
    preset = tmp_path / "budget.yaml"
    preset.write_text("max_iters: 50\n")
    config = load(loader, "--config", str(preset), "--time-budget", "5m")
    assert config.train.time_budget == 300.0  # the flag is above the file
    assert load(loader, "--time-budget", "1.5h").train.time_budget == 5400.0


def test_max_iters_and_a_budget_on_one_layer_is_an_error_naming_both(tmp_path):
    loader = make_loader(tmp_path, config_json={})
    with pytest.raises(ConfigError, match="--max-iters and --time-budget both say how long"):
        load(loader, "--max-iters", "10", "--time-budget", "60")
    assert load(loader, "--max-iters", "10", "--time-budget", "none").train.max_iters == 10
    with pytest.raises(ConfigError, match=r"time_budget: expected a duration such as 300, "
                                          r"300s or 5m or none, got '5 minutes'"):
        load(loader, "--time-budget", "5 minutes")


def test_a_config_file_overrides_dataclass_defaults(tmp_path):
    config = load(make_loader(tmp_path))
    assert config.train.batch_size == 7
    assert config.model.n_layer == 3
    assert config.train.seed == 1337  # untouched field keeps the dataclass default


def test_each_layer_overrides_the_one_below(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("batch_size: 9\nmax_iters: 11\n")
    env = {"CHARGPT_BATCH_SIZE": "10", "CHARGPT_MAX_ITERS": "12"}
    plain = make_loader(tmp_path, config_json={"batch_size": 8, "seed": 1})
    loader = ConfigLoader(cwd=tmp_path, environ=env)  # the same ./config.json

    assert load(plain).train.batch_size == 8  # ./config.json over the defaults
    assert load(plain, "--config", str(preset)).train.batch_size == 9
    config = load(loader, "--config", str(preset))
    assert (config.train.batch_size, config.train.max_iters) == (10, 12)  # env over --config
    config = load(loader, "--config", str(preset), "--batch-size", "13")
    assert (config.train.batch_size, config.train.max_iters) == (13, 12)  # flag over env
    assert config.train.seed == 1  # still from ./config.json


def test_int_is_accepted_for_a_float_field(tmp_path):
    config = load(make_loader(tmp_path, config_json={"learning_rate": 1}))
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


def test_none_turns_an_optional_setting_off(tmp_path):
    assert load(make_loader(tmp_path), "--grad-clip", "none").train.grad_clip is None


def test_boolean_flags_have_a_negative_form(tmp_path):
    loader = make_loader(tmp_path, config_json={"compile": True})
    assert load(loader).train.compile is True
    assert load(loader, "--no-compile").train.compile is False
    assert load(make_loader(tmp_path, env={"CHARGPT_BIAS": "yes"})).model.bias is True


def test_unknown_file_key_suggests_the_closest_field(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize' in ./config.json; "
                                          r"did you mean 'batch_size'\?"):
        load(make_loader(tmp_path, config_json={"batchsize": 4}))


def test_unknown_env_var_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'lerning_rate' in env CHARGPT_LERNING_RATE; "
                                          r"did you mean 'learning_rate'"):
        load(make_loader(tmp_path, env={"CHARGPT_LERNING_RATE": "0.1"}))


def test_unknown_flag_suggests_the_closest_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown flag --batch-sise; did you mean --batch-size"):
        load(make_loader(tmp_path), "--batch-sise", "3")


def test_bad_type_names_field_value_and_source(tmp_path):
    loader = make_loader(tmp_path, env={"CHARGPT_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match=r"batch_size: expected an integer, got 'many' "
                                          r"\(from env CHARGPT_BATCH_SIZE\)"):
        load(loader)
    loader = make_loader(tmp_path, config_json={"dropout": "high"})
    with pytest.raises(ConfigError, match=r"dropout: expected a finite number, got 'high' \(from "
                                          r"./config.json\)"):
        load(loader)


def test_choice_field_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"dtype: expected one of auto, float32, bfloat16, "
                                          r"float16, got 'fp8' \(from --dtype\)"):
        load(make_loader(tmp_path), "--dtype", "fp8")


def test_range_error_names_field_value_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size must be at least 1 \(batch_size=0 from "
                                          r"--batch-size\)"):
        load(make_loader(tmp_path), "--batch-size", "0")


@pytest.mark.parametrize("flags,switch", [(["--aim-repo", "tracked"], "--aim"),
                                           (["--wandb-project", "p"], "--wandb"),
                                           (["--wandb-mode", "offline"], "--wandb")])
def test_a_trackers_flag_while_the_tracker_is_off_is_refused(tmp_path, flags, switch):
    """Given as a flag, a tracker's setting with the tracker off would do nothing. A config
    file or an environment variable may set it for the runs that turn the tracker on, and the
    switch may come from any layer."""
    loader = ConfigLoader(cwd=tmp_path, environ={})
    with pytest.raises(ConfigError) as refused:
        load(loader, *flags)
    assert str(refused.value) == (f"{flags[0]} does nothing while {switch.lstrip('-')}_logging "
                                  f"is off; add {switch}, or leave {flags[0]} out")
    key = flags[0].removeprefix("--").replace("-", "_")
    assert getattr(load(loader, *flags, switch).train, key) == flags[1]
    team = tmp_path / "team.yaml"
    team.write_text(f"{key}: {flags[1]}\n")
    assert getattr(load(loader, "--config", str(team)).train, key) == flags[1]
    switched_on = ConfigLoader(cwd=tmp_path,
                               environ={f"CHARGPT_{switch.lstrip('-').upper()}_LOGGING": "true"})
    assert getattr(load(switched_on, *flags).train, key) == flags[1]


def test_head_count_must_divide_embedding_width(tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"n_embd": 100}))
    with pytest.raises(ConfigError, match=r"n_embd=100 must be divisible by n_head=3 \(n_embd=100 "
                                          rf"from --config {preset}, n_head=3 from --n-head\)"):
        load(make_loader(tmp_path), "--config", str(preset), "--n-head", "3")


def test_unparseable_and_missing_config_files_are_reported(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"cannot parse config file .*broken.yaml"):
        load(make_loader(tmp_path), "--config", str(broken))
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load(make_loader(tmp_path), "--config", str(tmp_path / "nope.yaml"))


def test_help_lists_every_flag_with_its_configured_default(capsys):
    with pytest.raises(SystemExit) as ended:  # argparse ends the process after the help
        train.main(["--help"])
    assert ended.value.code == 0
    stdout = capsys.readouterr().out
    for flag, default in (("--batch-size", "32"), ("--n-layer", "4"), ("--learning-rate", "0.003"),
                          ("--grad-clip", "1.0"), ("--compile", "False"), ("--run-tag", "run")):
        entry = stdout[stdout.index(f"\n  {flag}"):].split("\n  --")[1]
        assert f"(default: {default})" in " ".join(entry.split()), flag


def test_bad_value_on_the_command_line_exits_2_with_one_line_and_no_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train.main(["--n-head", "5", "--runs-dir", str(runs)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: n_embd=128 must be divisible by n_head=5 (n_embd=128 from default, "
        "n_head=5 from --n-head)"
    ]
    assert not runs.exists()


def test_a_resumed_run_keeps_its_resolved_max_iters(tmp_path):
    loader = make_loader(tmp_path, config_json={})
    saved = {"model": {}, "train": {"max_iters": 77, "time_budget": 4.0}}
    config = loader.load_for_resume(saved, loader.build_parser().parse_args([]))
    assert (config.train.max_iters, config.train.time_budget) == (77, 4.0)
    longer = loader.load_for_resume(saved, loader.build_parser().parse_args(
        ["--max-iters", "100"]))
    assert (longer.train.max_iters, longer.train.time_budget) == (100, None)
    with pytest.raises(ConfigError, match="cannot set time_budget when resuming .* became "
                                          "max_iters=77 when it started; pass --max-iters"):
        loader.load_for_resume(saved, loader.build_parser().parse_args(["--time-budget", "9"]))


def test_a_run_saved_before_the_new_options_resumes_as_it_trained(tmp_path):
    loader = make_loader(tmp_path, config_json={})
    saved = {"model": {"n_layer": 1}, "train": {"max_iters": 30}}
    config = loader.load_for_resume(saved, loader.build_parser().parse_args([]))
    assert (config.model.position, config.model.tie_embeddings) == ("learned", True)
    assert (config.train.optimizer, config.train.schedule) == ("adamw", "cosine")
    assert (config.train.max_iters, config.train.time_budget) == (30, None)
    assert config.train.normuon_beta2 is None  # a Muon run of then: plain Muon
    assert config.train.sampling == "random"  # its checkpoint holds a random batch stream


def test_sampling_is_epochs_by_default_and_random_on_request(tmp_path):
    loader = make_loader(tmp_path, config_json={})
    assert load(loader).train.sampling == "epochs"
    assert load(loader, "--sampling", "random").train.sampling == "random"
    classic = load(loader, "--config", str(PROJECT_ROOT / "configs/presets/classic.yaml"))
    assert classic.train.sampling == "random"  # nanoGPT's get_batch
    with pytest.raises(ConfigError, match=r"sampling: expected one of random, epochs, got "
                                          r"'sequential' \(from --sampling\)"):
        load(loader, "--sampling", "sequential")


def test_normuon_beta2_is_a_decay_or_none(tmp_path):
    loader = make_loader(tmp_path)
    assert load(loader, "--normuon-beta2", "none").train.normuon_beta2 is None
    with pytest.raises(ConfigError, match=r"normuon_beta2 must be in \[0, 1\) \(or none for "
                                          r"plain Muon\) \(normuon_beta2=1.0 from "
                                          r"--normuon-beta2\)"):
        load(loader, "--normuon-beta2", "1")


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_says_how_long_to_train(tmp_path, preset):
    """Presets name only known fields with valid values and say how long they train: the CPU
    ones in seconds, so they take the same time on any machine; the GPU one in steps, since on a
    small corpus more steps overfit."""
    config = load(make_loader(tmp_path, config_json={}), "--config", str(preset))
    if preset.stem == "gpu":
        assert (config.train.time_budget, config.train.max_iters) == (None, 350)
    else:
        assert config.train.time_budget is not None
    assert config.train.run_tag == preset.stem


def test_the_gpu_preset_is_the_baby_gpt_shape_on_the_default_recipe(tmp_path):
    config = load(make_loader(tmp_path, config_json={}), "--config", str(PRESETS_DIR / "gpu.yaml"))
    model, train = config.model, config.train
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (6, 6, 384, 256)
    assert (model.position, model.norm, model.mlp, train.optimizer) == (
        ModelConfig().position, ModelConfig().norm, ModelConfig().mlp, TrainConfig().optimizer)
