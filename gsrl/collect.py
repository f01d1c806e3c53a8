"""``gsrl collect``: record scripted-expert demonstrations of the run's task as a LeRobot dataset (SFT data).

The expert (``gsrl.tasks.expert``) reads the privileged sim state and acts in the task's own action space; what is
recorded is what a policy would see and do: the observation the run's policy gets (``state`` and, for a GSEnv task,
the splat-rendered ``rgb/<camera>`` images) and the expert's normalized action, at every control step. Several envs
step together so each render call draws a batch of them, as the env server does; by default only successful
episodes are kept, as the reference keeps only its planner's successes (fact sheet 3.7).

With ``--noise STD`` collection is DART (Laskey et al. 2017): the env runs the expert's action plus Gaussian noise,
so the demonstrations visit states off the clean path, and each state is labelled with the expert's *clean* action
for it (``--label expert``, the default), so the policy learns to recover without learning the noise;
``--label executed`` records the noisy action that was run instead. Success (and so which episodes are kept) is
that of the executed, noisy episode.

    gsrl collect -c gs_ppo --episodes 50 --out data/put-cube-demos [--noise 0.05] [--label expert] [--num-envs 4]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsrl.config import TaskConfig
from gsrl.data.lerobot import Episode, LeRobotWriter
from gsrl.env_spec import make_physics_env

log = logging.getLogger(__name__)

STATE_NAMES = (
    [f"qpos_{i}" for i in range(9)]
    + [f"qvel_{i}" for i in range(9)]
    + ["tcp_x", "tcp_y", "tcp_z", "tcp_qw", "tcp_qx", "tcp_qy", "tcp_qz"]
)
ACTION_NAMES = ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"]
LABELS = ("expert", "executed")
"""What a frame's ``action`` is: the expert's clean action for the state (DART), or the noisy one the env ran."""


@dataclass
class _Recording:
    """One env's episode in progress."""

    seed: int
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)


@dataclass
class CollectResult:
    attempted: int
    kept: int
    successes: int
    frames: int
    seconds: float

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.attempted, 1)


class ExpertCollector:
    """``num_envs`` single-env simulations of ``task`` driven by one expert each, observed as the run's policy is.

    Builds the envs as ``EnvBatch`` does (same physics task, frequencies, horizon and success test) but keeps the
    simulations in reach, since the expert reads their privileged state; for a GSEnv task a ``SplatObserver``
    renders all envs' images in one call per step.
    """

    def __init__(
        self, task: TaskConfig, num_envs: int, seed: int, noise_std: float = 0.0, label: str = "expert"
    ) -> None:
        import gsrl.tasks  # noqa: F401  (registers the tasks)
        from gsrl.tasks.expert import EXPERT_CONTROL_MODES, ExpertConfig, PutCubeOnPlateExpert

        if task.control_mode not in EXPERT_CONTROL_MODES:
            raise ValueError(f"the expert acts in {EXPERT_CONTROL_MODES}; task.control_mode is {task.control_mode!r}")
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        self.task = task
        self.noise_std = noise_std
        self.label = label
        self.envs: list[Any] = []
        self.observer: Any = None
        for _ in range(num_envs):
            self.envs.append(make_physics_env(task))
        if task.is_splat_rendered:
            from gsrl.tasks.gs_env import SplatObserver

            self.observer = SplatObserver([env.unwrapped for env in self.envs], task.render)
        self.experts = [PutCubeOnPlateExpert(ExpertConfig(noise_std=noise_std), seed=seed + i) for i in range(num_envs)]
        self._seeds = np.random.default_rng(seed)
        self.instruction = self.envs[0].unwrapped.get_language_instruction()[0]

    def _reset(self, i: int) -> tuple[_Recording, np.ndarray]:
        from gsrl.env_spec import flatten_observation
        from gsrl.tasks.gs_env import proprioception

        seed = int(self._seeds.integers(2**31 - 1))
        obs, _ = self.envs[i].reset(seed=seed)
        if self.observer is not None:
            self.observer.new_episode(i, seed)
        self.experts[i].reset()
        return _Recording(seed=seed), proprioception(_flat_numpy(flatten_observation(obs)))

    def collect(self, episodes: int, only_success: bool, writer: LeRobotWriter, max_attempts: int) -> CollectResult:
        """Run until ``episodes`` episodes are written (or ``max_attempts`` episodes were run); log progress."""
        from gsrl.env_spec import flatten_observation
        from gsrl.tasks.gs_env import proprioception

        started = last_log = time.perf_counter()
        result = CollectResult(attempted=0, kept=0, successes=0, frames=0, seconds=0.0)
        active = [self._reset(i) for i in range(len(self.envs))]
        while result.kept < episodes and result.attempted < max_attempts:
            images: dict[str, np.ndarray] = {}
            if self.observer is not None:
                images = self.observer.render([self.observer.snapshot(i) for i in range(len(self.envs))])
            for i, env in enumerate(self.envs):
                recording, state = active[i]
                step = self.experts[i].act(env)
                recording.states.append(state)
                recording.actions.append(step.expert if self.label == "expert" else step.executed)
                for key, frames in images.items():
                    recording.images.setdefault(key, []).append(frames[i])
                obs, _reward, terminated, truncated, info = env.step(step.executed)
                active[i] = (recording, proprioception(_flat_numpy(flatten_observation(obs))))
                if not (bool(terminated.item()) or bool(truncated.item())):
                    continue
                success = bool(info["success"].item())  # of the executed (noisy) episode
                result.attempted += 1
                result.successes += success
                if (success or not only_success) and result.kept < episodes:
                    writer.add_episode(
                        Episode(
                            states=np.stack(recording.states),
                            actions=np.stack(recording.actions),
                            images={k: np.stack(v) for k, v in recording.images.items()},
                            task=self.instruction,
                        )
                    )
                    result.kept += 1
                    result.frames += len(recording.actions)
                active[i] = self._reset(i)
            now = time.perf_counter()
            if now - last_log > 10.0 or result.kept >= episodes:
                last_log = now
                _log_progress(result, episodes, now - started)
        result.seconds = time.perf_counter() - started
        return result

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
        for env in self.envs:
            env.close()
        self.envs = []


def _flat_numpy(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """Batch-1 torch observation entries -> unbatched numpy arrays."""
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))[0] for k, v in flat.items()}


def _log_progress(result: CollectResult, target: int, elapsed: float) -> None:
    rate = result.kept / elapsed if elapsed > 0 else 0.0
    eta = (target - result.kept) / rate if rate > 0 else float("inf")
    log.info(
        "kept %d/%d episodes (%d run, success %.0f%%), %d frames, %.2f episodes/s, ETA %.0f s",
        result.kept,
        target,
        result.attempted,
        100.0 * result.success_rate,
        result.frames,
        rate,
        eta,
    )


def main(argv: Sequence[str] | None = None, prog: str = "gsrl collect") -> int:
    from gsrl.cli import add_config_arguments, parse_role_arguments

    parser = argparse.ArgumentParser(
        prog=prog, description="Record scripted-expert demonstrations of the run's task as a LeRobot v2.1 dataset."
    )
    add_config_arguments(parser)
    parser.add_argument("--episodes", type=int, required=True, help="episodes to write")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="STD",
        help="std of Gaussian noise added to the arm dimensions of the action the env runs (DART; default 0); the "
        "dataset's action is the expert's clean action unless --label executed",
    )
    parser.add_argument(
        "--label",
        choices=LABELS,
        default="expert",
        help="action recorded for each frame: 'expert' (default) the clean expert action for the state, "
        "'executed' the noisy action the env ran (identical when --noise is 0)",
    )
    parser.add_argument(
        "--only-success",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep only successful episodes (default; --no-only-success keeps every episode)",
    )
    parser.add_argument("--num-envs", type=int, default=4, help="envs stepped (and rendered) together (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="layout and noise seed (default run.seed)")
    parser.add_argument(
        "--max-attempts", type=int, default=None, help="stop after this many episodes run (default 3 x --episodes + 10)"
    )
    args, config = parse_role_arguments(parser, argv, "collect")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.num_envs < 1:
        parser.error(f"--num-envs must be >= 1, got {args.num_envs}")
    if args.noise < 0:
        parser.error(f"--noise must be >= 0, got {args.noise}")
    seed = config.run.seed if args.seed is None else args.seed
    max_attempts = args.max_attempts if args.max_attempts is not None else 3 * args.episodes + 10
    writer = LeRobotWriter(
        Path(args.out), fps=config.task.control_freq, state_names=STATE_NAMES, action_names=ACTION_NAMES
    )
    collector = ExpertCollector(
        config.task, min(args.num_envs, args.episodes), seed, noise_std=args.noise, label=args.label
    )
    try:
        result = collector.collect(args.episodes, args.only_success, writer, max_attempts)
    finally:
        collector.close()
    if result.kept == 0:
        print(f"no episode kept out of {result.attempted} run (success rate 0%); nothing written")
        return 1
    writer.close()
    print(
        f"expert success rate {100.0 * result.success_rate:.1f}% ({result.successes}/{result.attempted} episodes, "
        f"noise std {args.noise:g}, label {args.label}); "
        f"wrote {result.kept} episodes, {result.frames} frames to {args.out} in {result.seconds:.1f} s"
    )
    return 0 if result.kept >= args.episodes else 1
