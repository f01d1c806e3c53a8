"""``EnvBatch.film_env``: every control step of one env rendered for videos, identical to stepping one at a time.

GSEnv-PutCubeOnPlate-v0 on CPU (real ManiSkill physics, the PyTorch rasterizer), 32x32 images.
"""

from __future__ import annotations

import numpy as np
import pytest

import gsrl.tasks  # noqa: F401  (registers the tasks)
from gsrl.config import RenderConfig
from services.env_server.core import EnvBatch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

GS_TASK = "GSEnv-PutCubeOnPlate-v0"
KEY = "rgb/3rd_view_camera"


def _batch(cache_dir: str) -> EnvBatch:
    render = RenderConfig(width=32, height=32, cache_dir=cache_dir, device="cpu")
    return EnvBatch(GS_TASK, 2, obs_mode="rgb", max_episode_steps=50, seed=5, render=render)


def test_filmed_steps_are_the_frames_a_step_by_step_rollout_sees(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache_dir = str(tmp_path_factory.mktemp("splat-cache"))
    actions = np.random.default_rng(0).uniform(-1, 1, size=(2, 4, 7)).astype(np.float32)
    actions[:, :, 6] = 1.0  # gripper open: nothing to grasp, no episode ends in 4 steps

    with _batch(cache_dir) as stepwise:
        stepwise.reset()
        seen = []
        for k in range(4):
            result = stepwise.step_chunk(actions[:, k : k + 1])
            assert result.film_frames is None  # not filming: nothing extra rendered
            seen.append(result.observations[KEY][1])

    with _batch(cache_dir) as filmed:
        filmed.reset()
        filmed.film_env = 1
        result = filmed.step_chunk(actions)
    assert not result.ended.any()
    frames = result.film_frames[KEY]
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    for k in range(3):
        np.testing.assert_array_equal(frames[k], seen[k])
    np.testing.assert_array_equal(result.observations[KEY][1], seen[3])
    assert any(np.abs(frames[k].astype(int) - seen[3].astype(int)).max() > 0 for k in range(3)), "the arm moved"


def test_film_env_outside_the_batch_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    with _batch(str(tmp_path_factory.mktemp("splat-cache"))) as batch:
        batch.reset()
        batch.film_env = 2
        with pytest.raises(ValueError, match="film_env=2 is not an env of this batch"):
            batch.step_chunk(np.zeros((2, 1, 7), dtype=np.float32))
