"""EnvBatch on real ManiSkill CPU envs: chunked stepping, auto-reset bookkeeping, validation, reproducibility."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _cube_moves import move_cube_off_plate, put_cube_on_plate

from gsrl.tasks import LANGUAGE_INSTRUCTION
from services.env_server.core import EnvBatch, scale_actions

TASK = "PutCubeOnPlate-v0"
# ManiSkill 3.0.1 calls np.isnan on a torch action each step (BaseAgent.set_action); NumPy 2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
STATE_DIM = 53  # 46 task/proprio values + the ee controller's 7-D target pose (pd_ee_target_delta_pose)


@pytest.fixture(scope="module")
def batch() -> Iterator[EnvBatch]:
    """Two envs whose episodes are truncated after 4 steps, so auto-reset happens within a few chunks."""
    envs = EnvBatch(TASK, 2, max_episode_steps=4, seed=7)
    yield envs
    envs.close()


def open_still(num_envs: int, chunk_len: int) -> np.ndarray:
    """Zero arm motion with the gripper open: the scene stays as it is."""
    chunk = np.zeros((num_envs, chunk_len, 7), dtype=np.float32)
    chunk[..., 6] = 1.0
    return chunk


def test_spec_and_reset_shapes(batch: EnvBatch) -> None:
    assert batch.action_dim == 7
    assert batch.observation_spec == {"state": ((STATE_DIM,), np.dtype(np.float32))}
    assert batch.instructions == [LANGUAGE_INSTRUCTION] * 2
    obs = batch.reset()
    assert set(obs) == {"state"}
    assert obs["state"].shape == (2, STATE_DIM) and obs["state"].dtype == np.float32
    assert not np.array_equal(obs["state"][0], obs["state"][1])  # each env has its own layout


def test_step_chunk_shapes_and_rewards(batch: EnvBatch) -> None:
    batch.reset()
    rng = np.random.default_rng(0)
    result = batch.step_chunk(rng.uniform(-1, 1, (2, 3, 7)).astype(np.float32))
    assert result.observations["state"].shape == (2, STATE_DIM) and result.observations["state"].dtype == np.float32
    assert result.step_rewards.shape == (2, 3) and result.step_rewards.dtype == np.float32
    assert result.rewards.shape == (2,) and result.rewards.dtype == np.float32
    np.testing.assert_allclose(result.rewards, result.step_rewards.sum(axis=1), rtol=1e-6)
    assert np.all(result.step_rewards > 0) and np.all(result.step_rewards <= 1)  # normalized dense reward
    for flags in (result.terminated, result.truncated, result.episode_success_once):
        assert flags.shape == (2,) and flags.dtype == bool and not flags.any()
    assert result.episode_length.dtype == np.int32 and result.episode_return.dtype == np.float32
    assert result.steps_executed == 6
    np.testing.assert_array_equal(result.final_observations["state"], result.observations["state"])


def test_truncation_auto_resets_at_the_time_limit(batch: EnvBatch) -> None:
    batch.reset()
    first = batch.step_chunk(open_still(2, 3))
    assert not first.ended.any() and first.steps_executed == 6
    second = batch.step_chunk(open_still(2, 3))  # step 4 of 4 is the chunk's first step
    assert second.truncated.all() and not second.terminated.any()
    assert second.steps_executed == 2
    np.testing.assert_array_equal(second.episode_length, [4, 4])
    assert np.all(second.step_rewards[:, 1:] == 0)  # the rest of the chunk was not executed
    np.testing.assert_allclose(second.episode_return, first.rewards + second.rewards, rtol=1e-5)
    assert not second.episode_success_once.any()
    # final obs is the last state of the old episode; observations are the new episode's first state.
    assert not np.allclose(second.final_observations["state"], second.observations["state"])
    third = batch.step_chunk(open_still(2, 3))
    assert not third.ended.any() and third.steps_executed == 6  # new episodes count from 0 again


def test_termination_in_one_env_resets_only_that_env(batch: EnvBatch) -> None:
    batch.reset()
    put_cube_on_plate(batch, 0)
    result = batch.step_chunk(open_still(2, 3))
    np.testing.assert_array_equal(result.terminated, [True, False])
    assert not result.truncated.any()
    assert result.steps_executed == 1 + 3
    assert result.episode_length[0] == 1 and result.episode_success_once[0] and result.episode_success_at_end[0]
    assert result.step_rewards[0, 0] == pytest.approx(1.0) and np.all(result.step_rewards[0, 1:] == 0)
    assert result.episode_return[0] == pytest.approx(1.0)
    assert not np.allclose(result.final_observations["state"][0], result.observations["state"][0])
    np.testing.assert_array_equal(result.final_observations["state"][1], result.observations["state"][1])
    # Env 0's new episode runs its full 4 steps; env 1 hits its limit on the next chunk's first step.
    nxt = batch.step_chunk(open_still(2, 3))
    np.testing.assert_array_equal(nxt.truncated, [False, True])
    assert nxt.episode_length[1] == 4 and not nxt.episode_success_once[1]


def test_success_on_the_last_step_is_terminated_not_truncated(batch: EnvBatch) -> None:
    batch.reset()
    batch.step_chunk(open_still(2, 3))
    put_cube_on_plate(batch, 1)
    result = batch.step_chunk(open_still(2, 1))  # step 4 of 4: time limit and success together
    np.testing.assert_array_equal(result.terminated, [False, True])
    np.testing.assert_array_equal(result.truncated, [True, False])


def test_ignored_terminations_run_to_the_time_limit_and_tell_success_at_the_end() -> None:
    """RLinf's evaluation setting: a success does not end the episode, and an episode that was a success once but not
    at its last step (env 1: the cube leaves the plate) counts for success_once only."""
    with EnvBatch(TASK, 2, max_episode_steps=4, seed=7, ignore_terminations=True) as batch:
        batch.reset()
        put_cube_on_plate(batch, 0)
        put_cube_on_plate(batch, 1)
        first = batch.step_chunk(open_still(2, 2))
        assert not first.ended.any() and first.steps_executed == 4  # both succeeded, and both go on
        assert np.all(first.step_rewards[:, 0] == pytest.approx(1.0))
        move_cube_off_plate(batch, 1)
        last = batch.step_chunk(open_still(2, 3))  # steps 3 and 4 of 4
        np.testing.assert_array_equal(last.truncated, [True, True])
        assert not last.terminated.any() and last.steps_executed == 4
        np.testing.assert_array_equal(last.episode_length, [4, 4])
        np.testing.assert_array_equal(last.episode_success_once, [True, True])
        np.testing.assert_array_equal(last.episode_success_at_end, [True, False])


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (np.zeros((2, 3, 6), np.float32), r"\[B=2, C, A=7\], got \(2, 3, 6\)"),
        (np.zeros((3, 3, 7), np.float32), r"\[B=2, C, A=7\], got \(3, 3, 7\)"),
        (np.zeros((2, 7), np.float32), r"\[B=2, C, A=7\], got \(2, 7\)"),
        (np.zeros((2, 0, 7), np.float32), r"C >= 1"),
        (np.zeros((2, 3, 7), np.int64), r"floating .* got int64"),
        (np.full((2, 3, 7), np.nan, np.float32), r"non-finite"),
        ([[[0.0] * 7] * 3] * 2, r"numpy array"),
    ],
)
def test_bad_action_chunks_raise_value_error(batch: EnvBatch, chunk: np.ndarray, message: str) -> None:
    batch.reset()
    with pytest.raises(ValueError, match=message):
        batch.step_chunk(chunk)


def test_scale_actions_clips_then_maps_onto_the_box() -> None:
    low, high = np.array([-1.0, 0.0, -2.9]), np.array([1.0, 0.04, 2.9])
    actions = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.5], [7.0, -3.0, 2.0]])
    expected = np.array([[-1.0, 0.0, -2.9], [1.0, 0.04, 2.9], [0.0, 0.02, 1.45], [1.0, 0.0, 2.9]])
    out = scale_actions(actions, low, high)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_same_seed_reproduces_and_out_of_range_actions_act_as_clipped() -> None:
    with EnvBatch(TASK, 2, seed=3) as a, EnvBatch(TASK, 2, seed=3) as b:
        first = a.reset()["state"]
        np.testing.assert_array_equal(first, b.reset()["state"])
        chunk = np.random.default_rng(1).uniform(-4, 4, (2, 3, 7)).astype(np.float32)
        result_a = a.step_chunk(chunk)
        result_b = b.step_chunk(np.clip(chunk, -1, 1))
        assert np.all(np.isfinite(result_a.observations["state"]))
        np.testing.assert_array_equal(result_a.observations["state"], result_b.observations["state"])
        np.testing.assert_array_equal(result_a.step_rewards, result_b.step_rewards)
    with EnvBatch(TASK, 1, seed=4) as other:
        assert not np.allclose(other.reset()["state"][0], first[0])  # the seed does matter


def test_state_dict_observations_are_flattened_with_slash_keys() -> None:
    with EnvBatch(TASK, 1, obs_mode="state_dict", max_episode_steps=2) as envs:
        obs = envs.reset()
        assert set(obs) == set(envs.observation_spec)
        assert {"agent/qpos", "agent/qvel", "extra/cube_pose", "extra/plate_pose", "extra/is_grasped"} <= set(obs)
        for key, (shape, dtype) in envs.observation_spec.items():
            assert obs[key].shape == (1, *shape) and obs[key].dtype == dtype, key
        assert obs["agent/qpos"].dtype == np.float32 and obs["extra/is_grasped"].dtype == bool
        result = envs.step_chunk(open_still(1, 3))
        assert result.truncated[0] and result.episode_length[0] == 2
        assert set(result.final_observations) == set(obs)


def test_closed_batch_refuses_to_step() -> None:
    envs = EnvBatch(TASK, 1)
    with pytest.raises(RuntimeError, match="reset"):
        envs.step_chunk(open_still(1, 1))
    envs.close()
    envs.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        envs.reset()


def test_state_tasks_build_no_sapien_renderer(batch: EnvBatch) -> None:
    """An env server placed on the CPU of a GPU host has no Vulkan device, and SAPIEN crashed creating a renderer
    there (exit -11 in `gsrl train` on an H100 host, placement `separate`). State observations need none."""
    for env in batch._envs:
        assert env.unwrapped.backend.render_backend == "none"
        assert env.unwrapped.backend.render_device is None


def test_relative_reward_pays_each_change_once_and_restarts_with_each_episode() -> None:
    """Same seed, same actions: each relative reward is the change of the plain one (an episode's first step pays
    its whole reward), so an episode's relative rewards sum to its last plain reward. A truncation restarts it."""
    rng = np.random.default_rng(5)
    chunks = [rng.uniform(-1, 1, (2, 4, 7)).astype(np.float32) for _ in range(3)]
    with (
        EnvBatch(TASK, 2, max_episode_steps=6, seed=11) as plain,
        EnvBatch(TASK, 2, max_episode_steps=6, seed=11, relative_reward=True) as relative,
    ):
        plain.reset(), relative.reset()
        results = [(plain.step_chunk(chunk), relative.step_chunk(chunk)) for chunk in chunks]
    # 6-step episodes, chunks of 4: steps 1-4, then 5-6 (the truncation skips the chunk's last 2), then 1-4 again.
    assert [bool(a.truncated.all()) for a, _ in results] == [False, True, False]
    raw = np.concatenate([results[0][0].step_rewards, results[1][0].step_rewards[:, :2]], axis=1)  # episode 1
    rel = np.concatenate([results[0][1].step_rewards, results[1][1].step_rewards[:, :2]], axis=1)
    assert np.any(raw != 0)
    np.testing.assert_allclose(rel, np.diff(raw, axis=1, prepend=0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rel.sum(axis=1), raw[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][1].episode_return, raw[:, -1], rtol=1e-5, atol=1e-6)
    # Episode 2 starts from 0 again, not from episode 1's last reward.
    raw2, rel2 = results[2][0].step_rewards, results[2][1].step_rewards
    np.testing.assert_allclose(rel2, np.diff(raw2, axis=1, prepend=0.0), rtol=1e-5, atol=1e-6)


def first_states(layout_seed: int) -> np.ndarray:
    """The initial state of the layout ``layout_seed``: a one-layout pool starts every episode there."""
    with EnvBatch(TASK, 1, layout_seeds=[layout_seed], seed=99) as single:
        return single.reset()["state"][0]


def test_a_layout_pool_starts_every_episode_from_one_of_its_layouts() -> None:
    pool = [101, 202, 303]
    reference = np.stack([first_states(seed) for seed in pool])
    assert not np.allclose(reference[0], reference[1])  # the pool's layouts differ
    starts = []
    with EnvBatch(TASK, 2, max_episode_steps=1, layout_seeds=pool, seed=3) as envs:
        starts.extend(envs.reset()["state"])
        for _ in range(8):  # every 1-step episode ends and resets
            starts.extend(envs.step_chunk(open_still(2, 1)).observations["state"])
    matches = [int(np.flatnonzero(np.all(np.isclose(reference, s, atol=1e-6), axis=1))[0]) for s in starts]
    assert len(matches) == 18 and set(matches) == {0, 1, 2}  # 18 episodes, all from the pool, all of it used
    with EnvBatch(TASK, 1, max_episode_steps=1, seed=3) as fresh:
        fresh_starts = [fresh.reset()["state"][0]] + [fresh.step_chunk(open_still(1, 1)).observations["state"][0]]
    assert not any(np.all(np.isclose(reference, s, atol=1e-6), axis=1).any() for s in fresh_starts)


def test_cycled_layouts_give_each_pool_layout_once_in_evaluation_order() -> None:
    """Env i's j-th episode takes layout i + j * B: 2 envs with quotas 3 and 2 cover a 5-layout pool exactly."""
    pool = [11, 22, 33, 44, 55]
    reference = np.stack([first_states(seed) for seed in pool])
    with EnvBatch(TASK, 2, max_episode_steps=1, layout_seeds=pool, cycle_layouts=True) as envs:
        starts = [envs.reset()["state"]]
        starts += [envs.step_chunk(open_still(2, 1)).observations["state"] for _ in range(2)]
    order = [
        [int(np.flatnonzero(np.all(np.isclose(reference, s[i], atol=1e-6), axis=1))[0]) for s in starts] for i in (0, 1)
    ]
    assert order == [[0, 2, 4], [1, 3, 0]]  # env 1's third episode is beyond its quota of 2 and wraps


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layout_seeds": []}, "empty"),
        ({"cycle_layouts": True}, "needs layout_seeds"),
        ({"layout_seeds": [1], "cycle_layouts": True, "first_env": 2}, "unsplit"),
    ],
)
def test_bad_layout_pool_arguments_are_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        EnvBatch(TASK, 1, **kwargs)
