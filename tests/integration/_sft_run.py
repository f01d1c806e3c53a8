"""``gsrl sft`` as a subprocess on CPU (DeepSpeed needs its own process group), for the SFT tests to share."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gsrl.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_sft(
    data: Path, out: Path, overrides: Sequence[str], options: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """``gsrl sft -c gs_ppo`` of the VLA (chunk 4, ZeRO-1) on ``data`` into ``out``, with run-config ``overrides``
    and more CLI ``options``; DS_ACCELERATOR=cpu and a free rendezvous port."""
    env = dict(os.environ, MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "gsrl.cli", "sft", "-c", "gs_ppo", *overrides]
    command += ["policy.kind=vla", "policy.action_chunk=4", "learner.zero_stage=1"]
    command += ["--data", str(data), "--out", str(out), *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
