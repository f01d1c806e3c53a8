"""Evaluate a policy in-process on an ``EnvBatch``: success rate, return and episode length over N episodes.

``gsrl eval -c run.yaml --checkpoint runs/<run>/checkpoints/update_000120`` builds the run's task and policy, loads
the checkpoint's ``model.safetensors`` and rolls the policy out without gRPC, Redis or a learner, so a checkpoint can
be judged on its own (deterministic by default: the Gaussian mean, which is what a deployed policy would execute).

Unbiased episode counting: with B envs, stopping at the first N episodes to finish would over-count short episodes
(in this task successes end early, failures run to the time limit). Each env is instead given a fixed quota of
episodes up front, and episodes an env finishes beyond its quota are ignored.

Success once and success at the end: ManiSkill terminates an episode at its first success step (and gsrl's tasks have
no failure condition), so by default an episode that was ever successful ends on that success and the two rates are
the same number. ``--ignore-terminations`` is RLinf's evaluation setting: every episode runs to the time limit, and a
policy that lifts the cube off the plate again counts for success once but not at the end. Up to the first success
an episode is the same either way, so success once does not change with the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gsrl.checkpoint_files import resolve_weights
from gsrl.cli import add_config_arguments, parse_role_arguments
from gsrl.config import Config
from gsrl.env_spec import wire_dtype_name
from gsrl.policy import ObservationSpec, Policy, build_policy, load_model_weights
from services.env_server.core import EnvBatch
from services.env_server.recorder import EpisodeRecorder

log = logging.getLogger(__name__)

# Eval episodes draw their layouts from seeds far from the training env servers' (run.seed * 1000 + index * num_envs).
EVAL_SEED_OFFSET = 1_000_003
LAYOUT_CHOICES = ("held-out", "pool")


@dataclass(frozen=True)
class EvalResult:
    """Statistics of ``episodes`` complete episodes; the per-episode lists are in the order the episodes ended."""

    episodes: int
    success_once_rate: float
    """Fraction of episodes with a success at any step."""
    success_at_end_rate: float
    """Fraction of episodes that were a success at their last step (= success once unless terminations are ignored:
    success ends the episode)."""
    mean_return: float
    """Undiscounted return per episode in the task's reward mode (normalized_dense: at most 1 per step)."""
    mean_length: float
    """Env steps per episode; below the time limit only for episodes that terminated (succeeded)."""
    env_steps: int
    """Env steps run in total, including steps of envs that had already met their episode quota."""
    wall_s: float
    episode_returns: list[float]
    episode_lengths: list[int]
    episode_success_once: list[bool]
    episode_success_at_end: list[bool]
    episode_envs: list[int]
    """The env each episode ran on."""
    episode_numbers: list[int]
    """Each episode's number among its env's episodes. Two evaluations with the same seed, env count and episode
    count give (env, number) the same layout and image randomization, whatever the policy: ``gsrl compare`` pairs
    their episodes by it (the lists' order is the order episodes ended, which depends on the policy)."""


def _episode_quotas(num_episodes: int, num_envs: int) -> np.ndarray:
    """[B] episodes per env summing to ``num_episodes``, as even as possible (the first envs take the remainder)."""
    quotas = np.full(num_envs, num_episodes // num_envs, dtype=np.int64)
    quotas[: num_episodes % num_envs] += 1
    return quotas


@torch.no_grad()
def evaluate_policy(
    policy: Policy,
    batch: EnvBatch,
    num_episodes: int,
    deterministic: bool = True,
    log_every_s: float = 5.0,
    recorder: EpisodeRecorder | None = None,
) -> EvalResult:
    """Run ``policy`` on ``batch`` (reset first) until ``num_episodes`` episodes have finished; see the module doc.

    The policy acts on observations as float tensors on its own device, one action chunk [B, C, A] per call, with
    the batch's language instructions. ``deterministic`` takes the mode of the action distribution. The policy runs
    in eval mode and is put back in the mode it came in. ``recorder`` (image tasks) films env 0's episodes.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    was_training = policy.training
    policy.eval()
    try:
        return _run_episodes(policy, batch, num_episodes, deterministic, log_every_s, recorder)
    finally:
        policy.train(was_training)
        batch.film_env = None
        if recorder is not None:
            recorder.close()


def _run_episodes(
    policy: Policy,
    batch: EnvBatch,
    num_episodes: int,
    deterministic: bool,
    log_every_s: float,
    recorder: EpisodeRecorder | None = None,
) -> EvalResult:
    device = next(policy.parameters()).device
    quotas = _episode_quotas(num_episodes, batch.num_envs)
    finished = np.zeros(batch.num_envs, dtype=np.int64)
    returns: list[float] = []
    lengths: list[int] = []
    success_once: list[bool] = []
    success_at_end: list[bool] = []
    envs: list[int] = []
    numbers: list[int] = []
    env_steps = 0

    start = last_log = time.monotonic()
    observations = batch.reset()
    if recorder is not None:
        recorder.start(observations)
    while len(returns) < num_episodes:
        obs = {key: torch.as_tensor(value, device=device) for key, value in observations.items()}
        chunk = policy.act(obs, instructions=batch.instructions, deterministic=deterministic).action_chunk
        # Every step of a filmed episode is rendered for its video; the others render only what the policy reads.
        batch.film_env = 0 if recorder is not None and recorder.filming else None
        result = batch.step_chunk(chunk.float().cpu().numpy())
        if recorder is not None:
            recorder.record(result)
        env_steps += result.steps_executed
        for i in np.flatnonzero(result.ended):
            if finished[i] < quotas[i]:
                envs.append(int(i))
                numbers.append(int(finished[i]))
                finished[i] += 1
                returns.append(float(result.episode_return[i]))
                lengths.append(int(result.episode_length[i]))
                success_once.append(bool(result.episode_success_once[i]))
                success_at_end.append(bool(result.episode_success_at_end[i]))
        observations = result.observations

        now = time.monotonic()
        if now - last_log >= log_every_s and len(returns) < num_episodes:
            last_log = now
            rate = env_steps / (now - start)
            # The slowest env bounds the remaining time: it must finish its quota; assume full-length episodes.
            remaining_steps = int((quotas - finished).max()) * batch.max_episode_steps * batch.num_envs
            log.info(
                "eval: %d/%d episodes, success_once %.1f%%, %.0f env steps/s, ETA <= %.0f s",
                len(returns),
                num_episodes,
                100.0 * np.mean(success_once) if success_once else 0.0,
                rate,
                remaining_steps / max(rate, 1e-9),
            )

    return EvalResult(
        episodes=len(returns),
        success_once_rate=float(np.mean(success_once)),
        success_at_end_rate=float(np.mean(success_at_end)),
        mean_return=float(np.mean(returns)),
        mean_length=float(np.mean(lengths)),
        env_steps=env_steps,
        wall_s=time.monotonic() - start,
        episode_returns=returns,
        episode_lengths=lengths,
        episode_success_once=success_once,
        episode_success_at_end=success_at_end,
        episode_envs=envs,
        episode_numbers=numbers,
    )


def eval_video_dir(weights_file: Path) -> Path:
    """``runs/<run>/videos/eval/<checkpoint>``: next to the run's training videos when the checkpoint is in a run."""
    checkpoint_dir = weights_file.parent
    if checkpoint_dir.parent.name == "checkpoints":
        return checkpoint_dir.parent.parent / "videos" / "eval" / checkpoint_dir.name
    return checkpoint_dir / "videos" / "eval"


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate: honest at 0 % and 100 % and for small N, unlike p +- z*se."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def policy_observation_spec(batch: EnvBatch) -> ObservationSpec:
    """EnvBatch's numpy spec -> the policy's ``{key: (shape, torch dtype name)}`` (floats arrive as float32)."""
    return {
        key: (tuple(int(d) for d in shape), wire_dtype_name(dtype))
        for key, (shape, dtype) in batch.observation_spec.items()
    }


def build_eval_policy(config: Config, batch: EnvBatch) -> Policy:
    """The run's policy for ``batch``'s observations, randomly initialised (load weights afterwards)."""
    p = config.policy
    return build_policy(p.kind, policy_observation_spec(batch), batch.action_dim, p.action_chunk, **p.kwargs())


def main(argv: Sequence[str] | None = None, prog: str = "gsrl eval") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Roll a checkpointed policy out on the run's task and report its success rate."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="checkpoint directory holding model.safetensors (runs/<run>/checkpoints/update_N), or the file itself",
    )
    parser.add_argument("--episodes", type=int, default=50, help="episodes to evaluate (default 50)")
    parser.add_argument("--num-envs", type=int, default=None, help="envs run together (default env_server.num_envs)")
    parser.add_argument("--seed", type=int, default=None, help=f"layout seed (default run.seed + {EVAL_SEED_OFFSET})")
    parser.add_argument(
        "--layouts",
        choices=LAYOUT_CHOICES,
        default="held-out",
        help="held-out: new cube/plate layouts, seeded apart from training's (default); pool: the task.layout_pool "
        "fixed layouts the run trains on (RLinf's metric), in turn: each once in as many episodes as the pool has",
    )
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the mean")
    parser.add_argument(
        "--ignore-terminations",
        action="store_true",
        help="RLinf's evaluation setting: a success does not end the episode, every episode runs to "
        "task.max_episode_steps, and success at the end is reported beside success once (task.ignore_terminations)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="where the policy runs: cpu, cuda, cuda:N (default policy_server.device, the run's serving device)",
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="write the results (and what was run) as JSON")
    parser.add_argument(
        "--videos",
        type=int,
        default=0,
        metavar="N",
        help="image tasks: film env 0's first N episodes, every control step, to <run>/videos/eval/<checkpoint>/ "
        "(info drawn on)",
    )
    args, config = parse_role_arguments(parser, argv, "eval")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.num_envs is not None and args.num_envs < 1:
        parser.error(f"--num-envs must be >= 1, got {args.num_envs}")
    try:
        weights_file = resolve_weights(args.checkpoint)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    device = args.device or config.policy_server.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"policy device {device!r} (--device or policy_server.device) but CUDA is not available here")
    num_envs = config.env_server.num_envs if args.num_envs is None else args.num_envs
    seed = config.run.seed + EVAL_SEED_OFFSET if args.seed is None else args.seed
    pool_size = config.task.layout_pool
    if args.layouts == "pool" and pool_size == 0:
        parser.error("--layouts pool: the config has no layout pool (set task.layout_pool=N, as the run trained)")
    if args.layouts == "pool" and args.episodes % pool_size:
        log.warning(
            "--layouts pool: %d episodes do not cover the %d pool layouts evenly; some count once more than others",
            args.episodes,
            pool_size,
        )
    # Held-out layouts ignore the pool: every episode a new layout, from seeds training never draws.
    task = config.task if args.layouts == "pool" else dataclasses.replace(config.task, layout_pool=0)
    if args.ignore_terminations:
        task = dataclasses.replace(task, ignore_terminations=True)
    layouts = "held-out" if args.layouts == "held-out" else f"pool of {pool_size} (seed {task.layout_pool_seed})"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # physics dominates; keep one core per process

    with EnvBatch.for_task(task, num_envs, seed, cycle_layouts=args.layouts == "pool") as batch:
        policy = build_eval_policy(config, batch)
        try:
            policy.load_state_dict(load_model_weights(weights_file))
        except RuntimeError as exc:
            # Shape or key mismatches mean the checkpoint came from another policy config (hidden sizes, obs_norm,
            # action_chunk, control mode); say which config was used rather than only PyTorch's key list.
            print(
                f"{prog}: {weights_file} does not fit policy {config.policy} on {config.task.id} "
                f"({config.task.control_mode}, obs {policy_observation_spec(batch)}): {exc}",
                file=sys.stderr,
            )
            return 2
        policy.to(device)  # a VLA on one CPU thread decides a few times a second; the run serves it from its GPU
        log.info(
            "loaded %s on %s; evaluating %d episodes on %d envs (seed %d), layouts: %s",
            weights_file,
            device,
            args.episodes,
            num_envs,
            seed,
            layouts,
        )
        recorder = None
        image_keys = sorted(k for k in batch.observation_spec if k.startswith("rgb/"))
        if args.videos and image_keys:
            recorder = EpisodeRecorder(
                eval_video_dir(weights_file),
                1,
                image_keys[0],
                instruction=batch.instructions[0],
                info_on_video=config.env_server.info_on_video,
                fps=config.task.control_freq,  # a frame per control step (the batch films env 0)
                max_videos=args.videos,
            )
        elif args.videos:
            log.warning("--videos: %s has no camera images to film", config.task.id)
        result = evaluate_policy(policy, batch, args.episodes, deterministic=not args.stochastic, recorder=recorder)
        if recorder is not None:
            print(f"videos: {', '.join(str(p) for p in recorder.videos)}")

    mode = "stochastic" if args.stochastic else "deterministic"
    if task.ignore_terminations:
        mode += ", terminations ignored"
    low, high = wilson_interval(sum(result.episode_success_once), result.episodes)
    end_low, end_high = wilson_interval(sum(result.episode_success_at_end), result.episodes)
    at_end = ""
    if task.ignore_terminations:  # otherwise the same number as success_once
        at_end = (
            f"success_at_end {100 * result.success_at_end_rate:.1f}% "
            f"(95% CI {100 * end_low:.1f}-{100 * end_high:.1f}%), "
        )
    print(
        f"{config.task.id} {weights_file}: {result.episodes} episodes ({mode}, layouts {layouts}), "
        f"success_once {100 * result.success_once_rate:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%), "
        f"{at_end}mean return {result.mean_return:.2f}, "
        f"mean length {result.mean_length:.1f}, {result.wall_s:.0f} s"
    )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "checkpoint": str(weights_file),
            "task": config.task.id,
            "deterministic": not args.stochastic,
            "num_envs": num_envs,
            "seed": seed,
            "layouts": args.layouts,
            "layout_pool": pool_size if args.layouts == "pool" else 0,
            "ignore_terminations": task.ignore_terminations,
            "device": device,
            "config": config.to_dict(),
            "result": asdict(result),
            "success_once_ci95": [low, high],
            "success_at_end_ci95": [end_low, end_high],
        }
        out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
