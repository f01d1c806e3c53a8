"""``probe_env_spec`` reads the shaping ceiling off the real PutCubeOnPlate task, in dense modes only."""

from __future__ import annotations

import pytest

from gsrl.config import TaskConfig
from gsrl.env_spec import probe_env_spec
from gsrl.rl.reward_trap import reward_trap_warning
from gsrl.tasks import PutCubeOnPlateEnv

pytestmark = pytest.mark.integration


def test_dense_modes_report_the_tasks_shaping_ceiling_and_sparse_none() -> None:
    expected = PutCubeOnPlateEnv.max_shaping_reward / PutCubeOnPlateEnv.max_dense_reward
    dense = probe_env_spec(TaskConfig(id="PutCubeOnPlate-v0", obs_mode="state", reward_mode="normalized_dense"))
    assert dense.shaping_ceiling == pytest.approx(expected)
    sparse = probe_env_spec(TaskConfig(id="PutCubeOnPlate-v0", obs_mode="state", reward_mode="sparse"))
    assert sparse.shaping_ceiling is None
    # What the learner logs at start for the recipe's chunk-level settings on the dense reward:
    assert reward_trap_warning(dense.shaping_ceiling, 0.99, 5, "normalized_dense") is not None
