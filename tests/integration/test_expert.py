"""The scripted expert solves PutCubeOnPlate-v0 with the real physics, in both end-effector control modes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import gsrl.tasks  # noqa: F401  (registers the tasks)
from gsrl.tasks.expert import ExpertAction, ExpertConfig, Phase, PutCubeOnPlateExpert

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


def _run_episodes(control_mode: str, seeds: list[int], noise_std: float = 0.0) -> list[bool]:
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode=control_mode, max_episode_steps=50)
    expert = PutCubeOnPlateExpert(ExpertConfig(noise_std=noise_std), seed=0)
    outcomes = []
    try:
        for seed in seeds:
            env.reset(seed=seed)
            expert.reset()
            success = False
            for _ in range(50):
                action = expert.act(env).executed
                assert action.shape == (7,) and np.all(np.abs(action) <= 1.0)
                _, _, terminated, truncated, info = env.step(action)
                success = bool(info["success_strict"].item())
                if bool(terminated.item()) or bool(truncated.item()):
                    break
            outcomes.append(success)
    finally:
        env.close()
    return outcomes


@pytest.mark.parametrize("control_mode", ["pd_ee_delta_pose", "pd_ee_target_delta_pose"])
def test_expert_places_the_cube_in_most_episodes(control_mode: str) -> None:
    outcomes = _run_episodes(control_mode, seeds=[11, 22, 33, 44])
    assert sum(outcomes) >= 3, outcomes


def test_expert_phases_run_in_order_and_release_the_cube() -> None:
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose")
    expert = PutCubeOnPlateExpert()
    try:
        env.reset(seed=5)
        phases, grippers = [], []
        for _ in range(50):
            action = expert.act(env).executed
            phases.append(int(expert.phase))
            grippers.append(float(action[6]))
            _, _, terminated, _, _ = env.step(action)
            if bool(terminated.item()):
                break
    finally:
        env.close()
    assert bool(terminated.item()), "the episode should end in success"
    assert phases == sorted(phases), "a clean episode never goes back to an earlier phase"
    assert Phase.CLOSE in phases and phases[-1] >= Phase.OPEN
    assert grippers[-1] == 1.0, "the cube must be released (gripper open) at success"


def test_noise_changes_actions_but_keeps_them_in_range() -> None:
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose")
    try:
        env.reset(seed=1)
        clean = PutCubeOnPlateExpert(ExpertConfig()).act(env).executed
        noisy = PutCubeOnPlateExpert(ExpertConfig(noise_std=0.3), seed=1).act(env).executed
    finally:
        env.close()
    assert not np.allclose(clean[:6], noisy[:6])
    assert clean[6] == noisy[6] == 1.0  # the gripper command is never noised
    assert np.all(np.abs(noisy) <= 1.0)


def test_noise_is_executed_but_the_label_is_the_clean_action() -> None:
    """DART: the executed action is the clean one plus the expert's RNG noise (arm only, clipped); the label is
    clean."""
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose")
    std, seed = 0.3, 7
    try:
        env.reset(seed=1)
        reference = PutCubeOnPlateExpert(ExpertConfig()).act(env)
        step = PutCubeOnPlateExpert(ExpertConfig(noise_std=std), seed=seed).act(env)
    finally:
        env.close()
    assert isinstance(step, ExpertAction)
    assert step.expert.dtype == step.executed.dtype == np.float32
    np.testing.assert_array_equal(step.expert, reference.expert)  # the noise never reaches the label
    noise = np.random.default_rng(seed).normal(0.0, std, 6)  # the same RNG draw the expert makes
    np.testing.assert_allclose(step.executed[:6], np.clip(step.expert[:6] + noise, -1.0, 1.0), atol=1e-6)
    assert not np.allclose(step.executed[:6], step.expert[:6])
    assert step.executed[6] == step.expert[6] == 1.0  # the gripper command is never noised
    assert np.all(np.abs(step.executed) <= 1.0)


def test_without_noise_label_and_executed_action_are_identical() -> None:
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose")
    expert = PutCubeOnPlateExpert(ExpertConfig(noise_std=0.0), seed=3)
    try:
        env.reset(seed=2)
        for _ in range(20):
            step = expert.act(env)
            np.testing.assert_array_equal(step.expert, step.executed)
            env.step(step.executed)
    finally:
        env.close()


def test_noisy_rollout_labels_every_visited_state_with_the_clean_expert_action() -> None:
    """Along a noisy episode, each label equals what a noise-free expert (same phase machine) commands there."""
    env = gym.make("PutCubeOnPlate-v0", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose")
    noisy = PutCubeOnPlateExpert(ExpertConfig(noise_std=0.1), seed=4)
    shadow = PutCubeOnPlateExpert(ExpertConfig())
    differs = 0
    try:
        env.reset(seed=3)
        for _ in range(50):
            clean = shadow.act(env)  # reads the same state; advances its own identical phase machine
            step = noisy.act(env)
            assert noisy.phase == shadow.phase
            np.testing.assert_array_equal(step.expert, clean.expert)
            assert step.executed[6] == step.expert[6]
            differs += not np.allclose(step.executed[:6], step.expert[:6])
            _, _, terminated, truncated, _ = env.step(step.executed)
            if bool(terminated.item()) or bool(truncated.item()):
                break
    finally:
        env.close()
    assert differs > 5, "the noisy expert should have executed perturbed actions"
