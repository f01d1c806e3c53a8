"""Row 1: env steps/s of ``EnvBatch`` (one process, one env) against raw gymnasium ``env.step`` of the same env.

Both step ``PutCubeOnPlate-v0`` with state observations, the controller of ``configs/state_ppo.yaml`` and random
actions; both reset when an episode ends. The EnvBatch side adds action mapping, episode bookkeeping and
observation flattening, which is what this row prices. The issue's other env-server figure, Gaussian-splat
rendered against physics-only (same task, same process count), is ``bench/gs_render.py``.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np

from bench.common import Row, Sizes, interleaved
from gsrl.config import TaskConfig
from gsrl.env_spec import make_physics_env
from services.env_server.core import EnvBatch

TASK = TaskConfig(control_mode="pd_ee_delta_pose")  # configs/state_ppo.yaml
CHUNK = 1


def _raw_env() -> gym.Env:
    return make_physics_env(TASK, obs_mode=TASK.obs_mode)


def run(sizes: Sizes) -> list[Row]:
    steps = sizes.env_steps
    rng = np.random.default_rng(0)
    batch = EnvBatch.for_task(TASK, num_envs=1, seed=0)
    raw = _raw_env()
    try:
        batch.reset()
        raw.reset(seed=0)
        action_dim = batch.action_dim
        chunks = rng.uniform(-1, 1, size=(steps, 1, CHUNK, action_dim)).astype(np.float32)

        def env_batch() -> float:
            start = time.perf_counter()
            done = sum(batch.step_chunk(chunks[i]).steps_executed for i in range(steps))
            return done / (time.perf_counter() - start)

        def gymnasium() -> float:
            start = time.perf_counter()
            for i in range(steps):
                _obs, _reward, terminated, truncated, _info = raw.step(chunks[i, 0, 0])
                if bool(terminated) or bool(truncated):
                    raw.reset()
            return steps / (time.perf_counter() - start)

        env_batch(), gymnasium()  # warm-up: first steps build caches in SAPIEN and the controller
        g, b = interleaved(env_batch, gymnasium, sizes.repeats)
    finally:
        batch.close()
        raw.close()
    return [Row("env server", f"EnvBatch.step_chunk, {TASK.id} state, 1 env (vs gymnasium env.step)", g, b, "steps/s")]
