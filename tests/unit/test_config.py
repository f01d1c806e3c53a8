"""Config loading: defaults validate, overrides apply, and every error names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsrl.config import ConfigError, load_config


def test_defaults_are_valid_and_presets_load() -> None:
    config = load_config()
    assert config.algo.clip_ratio == pytest.approx(0.2)
    for preset in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        loaded = load_config(preset)
        assert loaded.run.name


def test_dotted_overrides_are_typed() -> None:
    config = load_config(None, ["algo.clip_ratio=0.1", "policy.hidden_sizes=[64, 32]", "task.obs_mode=state_dict"])
    assert config.algo.clip_ratio == pytest.approx(0.1)
    assert config.policy.hidden_sizes == (64, 32)
    assert config.task.obs_mode == "state_dict"


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert load_config(None, ["algo.lr=1"]).algo.lr == 1.0
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algo.update_epochs=1.5"])
    assert err.value.key == "algo.update_epochs"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("algo.clip_ratoi=0.1", "algo.clip_ratoi", "did you mean 'algo.clip_ratio'"),
        ("algo.gamma=1.5", "algo.gamma", "(0, 1]"),
        ("task.obs_mode=pixels", "task.obs_mode", "must be one of"),
        ("learner.zero_stage=4", "learner.zero_stage", "0, 1, 2 or 3"),
        ("policy.hidden_sizes=12", "policy.hidden_sizes", "expected a list"),
        ("env_server.num_envs=0", "env_server.num_envs", ">= 1"),
        ("task.sim_freq=30", "task.sim_freq", "multiple of control_freq"),
        ("redis.max_stream_len=4", "redis.max_stream_len", "segments_per_update"),
        ("algo.normalize_advantages=maybe", "algo.normalize_advantages", "true or false"),
        ("bogus.key=1", "bogus", "unknown key"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert fragment in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_yaml_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  clip_ratio: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "algo.clip_ratio"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["algo.clip_ratio"])
