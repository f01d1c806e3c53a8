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


def test_critic_lr_defaults_to_none_and_overrides_parse() -> None:
    assert load_config().algo.critic_lr is None
    assert load_config(None, ["algo.critic_lr=1.55e-4"]).algo.critic_lr == pytest.approx(1.55e-4)
    # PyYAML reads 1e-4 (no dot) as a string; float fields take it as the number it spells.
    config = load_config(None, ["algo.critic_lr=1e-4", "algo.lr=3e-6"])
    assert (config.algo.critic_lr, config.algo.lr) == (pytest.approx(1e-4), pytest.approx(3e-6))
    assert load_config(None, ["algo.critic_lr=1.55e-4", "algo.critic_lr=null"]).algo.critic_lr is None
    recipe = load_config(Path(__file__).parents[2] / "configs" / "gs_vla_ppo.yaml").algo
    assert (recipe.lr, recipe.critic_lr) == (pytest.approx(7.9e-6), pytest.approx(1.55e-4))


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
        ("algo.critic_lr=0", "algo.critic_lr", "> 0"),
        ("algo.critic_lr=-1.55e-4", "algo.critic_lr", "> 0"),
        ("algo.critic_lr=fast", "algo.critic_lr", "matches none of"),
        ("task.layout_pool=-1", "task.layout_pool", ">= 0"),
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


# ---------------------------------------------------------------- extends


def test_extends_merges_the_child_over_its_parent_key_by_key(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text(
        "run:\n  name: base\n  seed: 7\nalgo:\n  lr: 0.001\n  gamma: 0.9\npolicy:\n  hidden_sizes: [64, 64]\n"
    )
    (tmp_path / "variants").mkdir()
    child = tmp_path / "variants" / "child.yaml"
    child.write_text("extends: ../base.yaml\nrun:\n  name: child\npolicy:\n  hidden_sizes: [8]\n")
    config = load_config(child, ["algo.gamma=0.5"])
    assert config.run.name == "child" and config.run.seed == 7  # a section merged key by key
    assert config.algo.lr == 0.001 and config.algo.gamma == 0.5  # the parent's values, then the overrides
    assert tuple(config.policy.hidden_sizes) == (8,)  # lists are replaced whole, not merged


def test_extends_chains_and_reports_cycles_and_missing_parents(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("algo:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nalgo:\n  gamma: 0.8\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\nrun:\n  seed: 3\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.algo.lr, config.algo.gamma, config.run.seed) == (0.5, 0.8, 3)

    (tmp_path / "x.yaml").write_text("extends: y.yaml\n")
    (tmp_path / "y.yaml").write_text("extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*extended by"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="must name a config file"):
        load_config(tmp_path / "bad.yaml")


def test_layout_pool_is_a_fixed_function_of_its_size_and_seed() -> None:
    """Training env servers and `gsrl eval --layouts pool` build the pool apart: it must depend on nothing else."""
    assert load_config(None, []).task.layout_seeds() is None  # the default: a new layout every episode
    pool = load_config(None, ["task.layout_pool=64"]).task.layout_seeds()
    assert pool is not None and len(pool) == len(set(pool)) == 64
    assert all(0 <= seed < 2**31 for seed in pool)
    assert load_config(None, ["task.layout_pool=64", "run.seed=5"]).task.layout_seeds() == pool
    assert load_config(None, ["task.layout_pool=8"]).task.layout_seeds() == pool[:8]  # a smaller pool is a prefix
    other = load_config(None, ["task.layout_pool=64", "task.layout_pool_seed=1"]).task.layout_seeds()
    assert other is not None and not set(other) & set(pool)


def test_a_critic_warmup_needs_a_critic_lr() -> None:
    with pytest.raises(ConfigError, match="critic_lr") as err:
        load_config(None, ["algo.critic_warmup_updates=5"])
    assert err.value.key == "algo.critic_warmup_updates"
    assert load_config(None, ["algo.critic_warmup_updates=5", "algo.critic_lr=1e-3"]).algo.critic_warmup_updates == 5
