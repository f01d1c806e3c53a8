"""``gsrl render``: episode videos of a Gaussian-splat task, and the sim-vs-splat alignment check.

Rolls one env of the run's ``GSEnv-*`` task with a random policy, a checkpoint (deterministic) or a recorded
trajectory (``.npz`` with ``actions`` [T, A] in [-1, 1] and the layout ``seed``), renders every step through the
splat renderer and writes ``episode_<k>.mp4`` (cameras side by side, optionally with step / reward / success and the
instruction drawn on: ``--info-on-video``). Each episode's actions are saved as ``episode_<k>.npz`` so the same
trajectory can be replayed later, e.g. after re-aligning a scanned scene.

``--compare-sim`` also renders the third-person camera with SAPIEN's own renderer from the same state and intrinsics
and writes the splat / sim / 50 % blend videos and per-frame PSNR / SSIM (``gsrl.splat.overlay``): the check the
reference's ``align_sim_gs.py`` makes, and the figure that says how close the splat images are to the simulator's.

    gsrl render -c configs/gs_ppo.yaml --episodes 2 --out runs/render --info-on-video --compare-sim
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gsrl.tasks  # noqa: F401  (registers the tasks)
from gsrl.cli import add_config_arguments, parse_role_arguments
from gsrl.config import Config
from gsrl.env_spec import flatten_observation, make_physics_env
from gsrl.policy import Policy, build_policy
from gsrl.splat.overlay import write_overlay_videos
from gsrl.tasks.gs_env import SplatObserver, image_key, proprioception, reference_camera
from gsrl.video import VideoWriter, draw_info, info_lines, side_by_side
from services.env_server.core import scale_actions

log = logging.getLogger(__name__)


class ActionSource:
    """Where actions come from: ``policy`` (a checkpoint), ``replay`` (a recorded trajectory) or random."""

    def __init__(
        self, policy: Policy | None, replay: np.ndarray | None, action_dim: int, generator: np.random.Generator
    ) -> None:
        self.policy, self.replay, self.action_dim, self.generator = policy, replay, action_dim, generator
        self.queue: list[np.ndarray] = []

    def next(self, step: int, observations: dict[str, np.ndarray], instruction: str) -> np.ndarray | None:
        """The next action in [-1, 1], or None when a replayed trajectory is exhausted."""
        if self.replay is not None:
            return self.replay[step] if step < len(self.replay) else None
        if self.policy is None:
            return self.generator.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)
        if not self.queue:  # a policy plans a chunk; execute it open loop, as the env server does
            batch = {key: torch.from_numpy(value[None]) for key, value in observations.items()}
            chunk = self.policy.act(batch, [instruction], deterministic=True).action_chunk[0].numpy()
            self.queue = list(chunk)
        return self.queue.pop(0)


def _observations(observer: SplatObserver, raw_obs: Any, frames: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    flat = {
        k: (v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v))[0] for k, v in flatten_observation(raw_obs).items()
    }
    return {"state": proprioception(flat), **{key: frames[key][0] for key in frames}}


def _record_frame(
    observer: SplatObserver,
    video: VideoWriter,
    splat_frames: list[np.ndarray],
    sim_frames: list[np.ndarray],
    sim_env: Any | None,
    lines: list[str],
    info_on_video: bool,
) -> dict[str, np.ndarray]:
    """Render env 0's current state into the video (cameras side by side, ``lines`` drawn on when asked) and the
    overlay streams (first camera; SAPIEN's own render too when ``sim_env`` is given); return the frames."""
    frames = observer.render([observer.snapshot(0)])
    shown = side_by_side(*(frames[image_key(c)][0] for c in observer.cameras), gap=2)
    video.append(draw_info(shown, lines) if info_on_video else shown)
    splat_frames.append(frames[image_key(observer.cameras[0])][0])
    if sim_env is not None:
        sim_frames.append(sim_env.get_sensor_images()["3rd_view_camera"]["rgb"][0].cpu().numpy())
    return frames


def render_episodes(
    config: Config,
    out_dir: Path,
    episodes: int,
    *,
    policy: Policy | None = None,
    replay: np.ndarray | None = None,
    seed: int = 0,
    info_on_video: bool = False,
    compare_sim: bool = False,
    fps: float = 10.0,
) -> list[dict[str, Any]]:
    """Roll and record ``episodes`` episodes; returns one summary dict per episode (written as render.json too)."""
    task, render = config.task, config.task.render
    make_kwargs: dict[str, Any] = {}
    if compare_sim:  # SAPIEN renders the same camera at the splat images' size and intrinsics
        # ... and no randomization, or the splat's jittered camera and colours would be compared with a clean one.
        render = dataclasses.replace(
            render, brightness=0.0, color_jitter=0.0, camera_translation_std=0.0, camera_rotation_std_deg=0.0
        )
        camera = reference_camera(render.width, render.height)
        make_kwargs["sensor_configs"] = {
            "3rd_view_camera": dict(width=render.width, height=render.height, intrinsic=camera.K.numpy())
        }
    env = make_physics_env(task, **make_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    try:
        base = env.unwrapped
        observer = SplatObserver([base], render)
        instruction = base.get_language_instruction()[0]
        low, high = base.single_action_space.low, base.single_action_space.high
        source = ActionSource(policy, replay, int(low.shape[0]), np.random.default_rng(seed))
        for episode in range(episodes):
            episode_seed = seed + episode
            raw_obs, _ = env.reset(seed=episode_seed)
            observer.new_episode(0, episode_seed)
            source.queue.clear()
            splat_frames, sim_frames, actions = [], [], []
            path = out_dir / f"episode_{episode:03d}.mp4"
            success = False
            ret = 0.0
            with VideoWriter(path, fps=fps) as video:
                step, reward, ended = 0, None, False
                while True:
                    lines = info_lines(step=step, reward=reward, success=success, instruction=instruction)
                    frames = _record_frame(
                        observer, video, splat_frames, sim_frames, base if compare_sim else None, lines, info_on_video
                    )
                    if ended:
                        break
                    action = source.next(step, _observations(observer, raw_obs, frames), instruction)
                    if action is None:
                        break
                    actions.append(np.asarray(action, dtype=np.float32))
                    raw_obs, reward_t, terminated, truncated, info = env.step(scale_actions(action[None], low, high)[0])
                    reward = float(reward_t.reshape(-1)[0])
                    ret += reward
                    success = success or bool(info["success"].reshape(-1)[0])
                    step += 1
                    ended = bool(terminated.reshape(-1)[0]) or bool(truncated.reshape(-1)[0])
            np.savez(out_dir / f"episode_{episode:03d}.npz", actions=np.stack(actions), seed=episode_seed)
            summary: dict[str, Any] = {
                "episode": episode,
                "seed": episode_seed,
                "steps": len(actions),
                "return": ret,
                "success_once": success,
                "video": str(path),
            }
            if compare_sim:
                overlay = write_overlay_videos(
                    sim_frames, splat_frames, out_dir, fps=fps, layout="both", prefix=f"episode_{episode:03d}_"
                )
                summary["splat_vs_sim"] = {k: overlay[k] for k in ("psnr_mean", "psnr_min", "ssim_mean", "ssim_min")}
            log.info("episode %d: %s", episode, json.dumps({k: v for k, v in summary.items() if k != "video"}))
            summaries.append(summary)
    finally:
        env.close()
    (out_dir / "render.json").write_text(json.dumps(summaries, indent=2))
    return summaries


def main(argv: Sequence[str] | None = None, prog: str = "gsrl render") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", help="policy checkpoint (model.safetensors or its directory)")
    source.add_argument("--trajectory", metavar="NPZ", help="replay recorded actions (episode_<k>.npz of a render)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes to record (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="layout seed of the first episode (default: run.seed)")
    parser.add_argument("--out", default="runs/render", help="output directory (default runs/render)")
    parser.add_argument("--fps", type=float, default=10.0, help="video frame rate (default 10, the control rate)")
    parser.add_argument("--info-on-video", action="store_true", help="draw step, reward, success, instruction")
    parser.add_argument("--compare-sim", action="store_true", help="also render with SAPIEN; write overlay + PSNR")
    args, config = parse_role_arguments(parser, argv, "render")
    if not config.task.is_splat_rendered:
        parser.error(f"task.id {config.task.id!r} is not a Gaussian-splat task; use GSEnv-... with task.obs_mode=rgb")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    seed = config.run.seed if args.seed is None else args.seed
    policy = replay = None
    if args.trajectory:
        path = Path(args.trajectory)
        if not path.is_file():
            parser.error(f"trajectory file not found: {path}")
        with np.load(path) as data:
            if "actions" not in data or data["actions"].ndim != 2:
                parser.error(f"{path} must hold 'actions' [T, A] (and 'seed'), as gsrl render writes")
            replay = data["actions"].astype(np.float32)
            if args.seed is None and "seed" in data:
                seed = int(data["seed"])
    elif args.checkpoint:
        from gsrl.checkpoint_files import resolve_weights
        from gsrl.env_spec import probe_env_spec
        from gsrl.policy import load_model_weights

        try:
            weights = resolve_weights(args.checkpoint)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        spec = probe_env_spec(config.task)
        p = config.policy
        policy = build_policy(p.kind, spec.observation_spec, spec.action_dim, p.action_chunk, **p.kwargs())
        policy.load_state_dict(load_model_weights(weights))
        policy.eval()
    summaries = render_episodes(
        config,
        Path(args.out),
        args.episodes,
        policy=policy,
        replay=replay,
        seed=seed,
        info_on_video=args.info_on_video,
        compare_sim=args.compare_sim,
        fps=args.fps,
    )
    for s in summaries:
        extra = ""
        if "splat_vs_sim" in s:
            m = s["splat_vs_sim"]
            extra = (
                f", splat vs SAPIEN PSNR {m['psnr_mean']:.1f} dB (min {m['psnr_min']:.1f}), SSIM {m['ssim_mean']:.3f}"
            )
        print(f"episode {s['episode']}: {s['steps']} steps, success {s['success_once']}{extra} -> {s['video']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
