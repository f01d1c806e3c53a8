"""What a task's observations and actions look like, read off one real environment.

The policy server and the learner must build the same model as the env servers feed; asking
the task itself (one CPU env, created and closed) keeps the three in agreement without a
hand-written table of dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gsrl.config import GS_TASK_PREFIX, TaskConfig


@dataclass(frozen=True)
class EnvSpec:
    # key -> (per-env shape, torch dtype name), e.g. {"state": ((42,), "float32")}
    observation_spec: dict[str, tuple[tuple[int, ...], str]]
    action_dim: int
    instruction: str
    # A non-success step's largest reward as a fraction of the success step's, for tasks that declare it
    # (``max_shaping_reward`` / ``max_dense_reward``) in a dense reward mode; None otherwise (``gsrl.rl.reward_trap``).
    shaping_ceiling: float | None = None


def flatten_observation(obs: Any, prefix: str = "") -> dict[str, Any]:
    """Nested observation dicts -> flat ``{"agent/qpos": array}``; a bare array becomes ``{"state": array}``."""
    if not isinstance(obs, Mapping):
        return {prefix or "state": obs}
    flat: dict[str, Any] = {}
    for key, value in obs.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(flatten_observation(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def wire_dtype_name(dtype: np.dtype) -> str:
    """The torch dtype name an observation of numpy ``dtype`` has on the wire (floats travel as float32)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return "float32"
    if dtype.kind == "b":
        return "bool"
    if dtype == np.uint8:
        return "uint8"
    return "int64" if dtype.itemsize == 8 else "int32"


def _numpy_dtype(value: Any) -> np.dtype:
    return np.asarray(value.cpu() if hasattr(value, "cpu") else value).dtype


def make_physics_env(task: TaskConfig, obs_mode: str = "state_dict", **extra: Any) -> Any:
    """One CPU-physics env of ``task``'s physics (a ``GSEnv-`` id without its prefix) as the run configures it:
    controller, reward, time limit, frequencies (through ManiSkill's generic ``sim_config``) and success test.

    For tools that drive single envs themselves (demonstration collection, videos, benchmarks); ``extra`` goes to
    ``gym.make`` (e.g. ``sensor_configs``).
    """
    import gymnasium as gym

    import gsrl.tasks  # noqa: F401  (registers the tasks)

    return gym.make(
        task.id.removeprefix(GS_TASK_PREFIX),
        num_envs=1,
        obs_mode=obs_mode,
        control_mode=task.control_mode,
        reward_mode=task.reward_mode,
        max_episode_steps=task.max_episode_steps,
        sim_backend="physx_cpu",
        sim_config=dict(sim_freq=task.sim_freq, control_freq=task.control_freq),
        success_mode=task.success_mode,
        **extra,
    )


def probe_env_spec(task: TaskConfig) -> EnvSpec:
    """Create one env of ``task``, reset it, and read the observation layout and action size.

    A Gaussian-splat task is probed through its physics task: its images' shapes follow from the render config
    (``gsrl.tasks.gs_env.observation_shapes``), so probing never builds a splat scene or a renderer.
    """
    import gymnasium as gym

    import gsrl.tasks  # noqa: F401  (registers the tasks)

    splat = task.is_splat_rendered
    env = gym.make(
        task.id.removeprefix(GS_TASK_PREFIX),
        num_envs=1,
        obs_mode="state" if splat else task.obs_mode,
        control_mode=task.control_mode,
        reward_mode=task.reward_mode,
        sim_backend="physx_cpu",
        render_mode=None,
        render_backend="none",  # probing needs no renderer; a CPU-placed role on a GPU host has no Vulkan device
    )
    try:
        obs, _info = env.reset(seed=0)
        flat = flatten_observation(obs)
        spec = {k: (tuple(int(d) for d in np.shape(v)[1:]), wire_dtype_name(_numpy_dtype(v))) for k, v in flat.items()}
        action_dim = int(env.action_space.shape[-1])
        base = env.unwrapped
        instruction = ""
        if hasattr(base, "get_language_instruction"):
            instruction = base.get_language_instruction()[0]
        shaping_ceiling = None
        if task.reward_mode in ("dense", "normalized_dense") and hasattr(base, "max_shaping_reward"):
            shaping_ceiling = float(base.max_shaping_reward) / float(base.max_dense_reward)
    finally:
        env.close()
    if splat:
        from gsrl.tasks.gs_env import observation_shapes

        spec = {
            key: (shape, "uint8" if key.startswith("rgb/") else "float32")
            for key, shape in observation_shapes(task.render).items()
        }
    return EnvSpec(
        observation_spec=spec, action_dim=action_dim, instruction=instruction, shaping_ceiling=shaping_ceiling
    )
