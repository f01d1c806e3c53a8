"""One env process for the env-scaling row and the whole-loop baseline: ``python -m bench._env_worker``.

A separate process (not a thread) because ManiSkill's CPU physics holds the GIL while it steps: only processes
scale across cores, exactly as env servers do. The parent starts several, waits for each to print ``ready``, then
sends ``run SECONDS`` to all of them at once so they step over the same window, and reads one JSON line back from
each. With ``--policy`` every chunk comes from the run's policy (``policy.act`` on the batch, as the policy server
computes it) instead of uniform random actions: that is the whole-loop row's no-transport baseline.

Protocol on stdin/stdout, one line each: ``{"ready": true}`` once built and warmed up; then per ``run S`` command
``{"steps": N, "seconds": T}``; ``quit`` (or EOF) exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from gsrl.cli import resolve_config_path
from gsrl.config import load_config
from gsrl.env_spec import wire_dtype_name
from gsrl.policy import build_policy
from services.env_server.core import EnvBatch

WARMUP_CHUNKS = 5  # first steps build SAPIEN's caches and the controller's state


def _policy_actions(batch: EnvBatch, config) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    spec = {key: (shape, wire_dtype_name(dtype)) for key, (shape, dtype) in batch.observation_spec.items()}
    torch.manual_seed(config.run.seed)
    policy = build_policy(
        config.policy.kind, spec, batch.action_dim, config.policy.action_chunk, **config.policy.kwargs()
    ).eval()

    def actions(observations: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = policy.act({k: torch.from_numpy(v) for k, v in observations.items()}, batch.instructions)
        return out.action_chunk.numpy()

    return actions


def _random_actions(batch: EnvBatch, chunk: int, seed: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch.num_envs, chunk, batch.action_dim)
    return lambda _observations: rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._env_worker", description=__doc__)
    parser.add_argument("--config", default="state_ppo", help="run config (path or preset name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", action="store_true", help="act with the run's policy instead of random actions")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (key=value)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per env process, as env servers run
    config = load_config(resolve_config_path(args.config), args.overrides)
    batch = EnvBatch.for_task(config.task, config.env_server.num_envs, seed=args.seed)
    try:
        if args.policy:
            actions = _policy_actions(batch, config)
        else:
            actions = _random_actions(batch, config.policy.action_chunk, args.seed)
        observations = batch.reset()

        def step() -> int:
            nonlocal observations
            result = batch.step_chunk(actions(observations))
            observations = result.observations
            return result.steps_executed

        for _ in range(WARMUP_CHUNKS):
            step()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            window_s = float(command[1])
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < window_s:
                steps += step()
            print(json.dumps({"steps": steps, "seconds": time.perf_counter() - start}), flush=True)
    finally:
        batch.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
