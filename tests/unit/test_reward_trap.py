"""The shaped-reward trap check (``gsrl.rl.reward_trap``) and the presets it guards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gsrl.config import load_config
from gsrl.rl.reward_trap import config_reward_trap_warning, hover_to_success_ratio, reward_trap_warning

PRESETS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
# PutCubeOnPlate's max_shaping_reward / max_dense_reward (1 / 10); the integration test reads it off the real task.
PUT_CUBE_SHAPING_CEILING = 0.1


def test_hovering_value_is_the_discounted_shaping_of_every_decision() -> None:
    assert hover_to_success_ratio(0.1, 0.8, 1) == pytest.approx(0.5)  # per-step PPO, ManiSkill's gamma
    assert hover_to_success_ratio(0.1, 0.99, 5) == pytest.approx(50.0)  # chunk-level PPO, the recipe's gamma
    assert math.isinf(hover_to_success_ratio(0.1, 1.0, 1))


def test_the_recipe_with_the_dense_reward_is_flagged_and_names_its_settings() -> None:
    warning = reward_trap_warning(0.1, 0.99, 5, "normalized_dense")
    assert warning is not None
    assert "algo.gamma=0.99" in warning and "policy.action_chunk=5" in warning and "50x" in warning
    assert "task.reward_mode=sparse" in warning


def test_safe_settings_and_sparse_rewards_pass() -> None:
    assert reward_trap_warning(0.1, 0.8, 1, "normalized_dense") is None
    assert reward_trap_warning(None, 0.99, 5, "sparse") is None  # no shaping to collect


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_no_preset_pays_more_for_hovering_than_for_success(preset: Path) -> None:
    config = load_config(preset)
    dense = config.task.reward_mode in ("dense", "normalized_dense")
    ceiling = PUT_CUBE_SHAPING_CEILING if dense and "PutCubeOnPlate" in config.task.id else None
    assert config_reward_trap_warning(config, ceiling) is None


def test_a_relative_reward_cannot_pay_for_hovering() -> None:
    assert reward_trap_warning(0.1, 0.99, 5, "normalized_dense", relative=True) is None


def test_the_config_form_reads_the_runs_settings() -> None:
    """What the learner and ``gsrl check`` call: the old preset's settings (dense, chunk 5, gamma 0.99) are flagged,
    the same with the relative reward are not."""
    trapped = load_config(None, ["task.reward_mode=normalized_dense", "policy.action_chunk=5", "algo.gamma=0.99"])
    assert config_reward_trap_warning(trapped, PUT_CUBE_SHAPING_CEILING) == reward_trap_warning(
        PUT_CUBE_SHAPING_CEILING, 0.99, 5, "normalized_dense"
    )
    relative = trapped.with_overrides(["task.relative_reward=true"])
    assert config_reward_trap_warning(relative, PUT_CUBE_SHAPING_CEILING) is None
