"""Config layering (defaults < configs/ < ./config.json < --config < env < flags) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_script
from utils.config import ConfigError, ConfigLoader


def make_loader(tmp_path: Path, env: dict[str, str] | None = None,
                train_yaml: str = "batch_size: 7\n") -> ConfigLoader:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "train.yaml").write_text(train_yaml)
    (tmp_path / "configs" / "model.yaml").write_text("n_layer: 3\n")
    return ConfigLoader(root=tmp_path, cwd=tmp_path, environ=env or {})


def load(loader: ConfigLoader, *argv: str):
    return loader.load(loader.build_parser().parse_args(list(argv)))


def test_configs_files_override_dataclass_defaults(tmp_path):
    config = load(make_loader(tmp_path))
    assert config.train.batch_size == 7
    assert config.model.n_layer == 3
    assert config.train.seed == 1337  # untouched field keeps the dataclass default


def test_each_layer_overrides_the_one_below(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"batch_size": 8, "seed": 1}))
    preset = tmp_path / "preset.yaml"
    preset.write_text("batch_size: 9\nmax_iters: 11\n")
    env = {"CHARGPT_BATCH_SIZE": "10", "CHARGPT_MAX_ITERS": "12"}
    loader = make_loader(tmp_path, env=env)

    assert load(make_loader(tmp_path)).train.batch_size == 8  # ./config.json over configs/
    assert load(make_loader(tmp_path), "--config", str(preset)).train.batch_size == 9
    config = load(loader, "--config", str(preset))
    assert (config.train.batch_size, config.train.max_iters) == (10, 12)  # env over --config
    config = load(loader, "--config", str(preset), "--batch-size", "13")
    assert (config.train.batch_size, config.train.max_iters) == (13, 12)  # flag over env
    assert config.train.seed == 1  # still from ./config.json


def test_int_is_accepted_for_a_float_field(tmp_path):
    config = load(make_loader(tmp_path, train_yaml="learning_rate: 1\n"))
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


def test_none_turns_an_optional_setting_off(tmp_path):
    assert load(make_loader(tmp_path), "--grad-clip", "none").train.grad_clip is None


def test_boolean_flags_have_a_negative_form(tmp_path):
    loader = make_loader(tmp_path, train_yaml="compile: true\n")
    assert load(loader).train.compile is True
    assert load(loader, "--no-compile").train.compile is False
    assert load(make_loader(tmp_path, env={"CHARGPT_BIAS": "yes"})).model.bias is True


def test_unknown_file_key_suggests_the_closest_field(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize' in configs/train.yaml; "
                                          r"did you mean 'batch_size'\?"):
        load(make_loader(tmp_path, train_yaml="batchsize: 4\n"))


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
    loader = make_loader(tmp_path)
    (tmp_path / "configs" / "model.yaml").write_text("dropout: high\n")
    with pytest.raises(ConfigError, match=r"dropout: expected a number, got 'high' \(from "
                                          r"configs/model.yaml\)"):
        load(loader)


def test_choice_field_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"dtype: expected one of auto, float32, bfloat16, "
                                          r"float16, got 'fp8' \(from --dtype\)"):
        load(make_loader(tmp_path), "--dtype", "fp8")


def test_range_error_names_field_value_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size must be at least 1 \(batch_size=0 from "
                                          r"--batch-size\)"):
        load(make_loader(tmp_path), "--batch-size", "0")


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


def test_help_lists_every_flag_with_its_configured_default():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for flag, default in (("--batch-size", "32"), ("--n-layer", "4"), ("--learning-rate", "0.002"),
                          ("--grad-clip", "1.0"), ("--compile", "False"), ("--run-tag", "run")):
        entry = result.stdout[result.stdout.index(f"\n  {flag}"):].split("\n  --")[1]
        assert f"(default: {default})" in " ".join(entry.split()), flag


def test_bad_value_on_the_command_line_exits_2_with_one_line_and_no_run(tmp_path):
    runs = tmp_path / "runs"
    result = run_script("train.py", "--n-head", "5", "--runs-dir", str(runs), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: n_embd=128 must be divisible by n_head=5 (n_embd=128 from configs/model.yaml, "
        "n_head=5 from --n-head)"
    ]
    assert not runs.exists()
