"""``gsrl sft`` as a subprocess on CPU (DeepSpeed needs its own process group), for the SFT tests to share."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gsrl.data.lerobot import Episode, LeRobotWriter
from gsrl.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_sft(
    data: Path | Sequence[Path], out: Path, overrides: Sequence[str], options: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """``gsrl sft -c gs_ppo`` of the VLA (chunk 4, ZeRO-1) on ``data`` into ``out``, with run-config ``overrides``
    and more CLI ``options``; DS_ACCELERATOR=cpu and a free rendezvous port."""
    env = dict(os.environ, MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "gsrl.cli", "sft", "-c", "gs_ppo", *overrides]
    command += ["policy.kind=vla", "policy.action_chunk=4", "learner.zero_stage=1"]
    datasets = [data] if isinstance(data, Path) else list(data)
    command += ["--data", *map(str, datasets), "--out", str(out), *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def synthetic_dataset(root: Path, seed: int = 0, state_scale: float = 1.0, size: int = 32) -> Path:
    """A small LeRobot dataset of the splat task's shapes (size x size camera, 25-d state, 7-d action), two episodes
    of a moving square, so SFT checks do not depend on the scripted expert; ``state_scale`` widens the states."""
    writer = LeRobotWriter(root, fps=20)
    rng = np.random.default_rng(seed)
    for length in (6, 8):
        frames = np.zeros((length, size, size, 3), dtype=np.uint8)
        for t in range(length):  # a moving square on a coloured field
            frames[t] = (40 + 10 * t, 80, 120)
            frames[t, 4 + t : 16 + t, 8:20] = (220, 200, 30)
        writer.add_episode(
            Episode(
                states=(state_scale * rng.normal(size=(length, 25))).astype(np.float32),
                actions=rng.uniform(-1, 1, size=(length, 7)).astype(np.float32),
                images={"rgb/3rd_view_camera": frames},
                task="pick up the cube and put it on the plate",
            )
        )
    writer.close()
    return root
