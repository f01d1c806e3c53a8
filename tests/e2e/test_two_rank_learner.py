"""`gsrl train` with the learner as 2 DeepSpeed ranks (ZeRO-2) on gloo: the multi-GPU issue's code path as far as
CPUs take it (the NCCL broadcast between two GPUs is tests/gpu/test_two_gpu_broadcast.py, skipped without them).

Both ranks must update in step (the stop decision is all-reduced), only rank 0 publishes weights, and every rank
must exit on its own once the run ends: on 2 x H100 the learners trained, then never exited (NCCL teardown).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from _tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
MAX_UPDATES = 3


def test_two_learner_ranks_train_in_step_and_exit(tmp_path: Path) -> None:
    run_dir = tmp_path / "two-ranks"
    overrides = [
        *TINY_RUN,  # 2 envs, 10-step episodes, 2 segments per update, no checkpoints or metrics ports
        "run.name=two-ranks",
        f"run.max_updates={MAX_UPDATES}",
        "run.duration_s=600",
        "env_server.num_servers=1",
        "policy_server.metrics_port=0",
        "learner.world_size=2",
        "learner.zero_stage=2",
        "redis.max_stream_len=16",
        "algo.target_kl=0.01",  # stopping early on the KL averaged over the ranks must keep them in step
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gsrl.cli", "train", "-c", "state_ppo", "--run-dir", str(run_dir), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = {p.name: p.read_text() for p in sorted((run_dir / "logs").glob("*.log"))}
    shown = "\n".join(f"--- {name}\n{text[-2000:]}" for name, text in logs.items())
    assert proc.returncode == 0, f"gsrl train failed:\n{proc.stdout}\n{proc.stderr}\n{shown}"
    for rank in (0, 1):
        stopped = re.search(rf"rank {rank}: stopped after (\d+) updates", logs[f"learner-{rank}.log"])
        assert stopped and int(stopped.group(1)) == MAX_UPDATES, shown
        assert "teardown failed" not in logs[f"learner-{rank}.log"]
    assert "weight publisher" in logs["learner-0.log"] and "weight publisher" not in logs["learner-1.log"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert int(summary["learner"]["policy_version"]) == MAX_UPDATES
    produced = summary["segments_produced"]
    assert produced == summary["segments_consumed"] + summary["segments_dropped"] + summary["segments_in_stream"]
    assert "did not stop within" not in proc.stdout + proc.stderr  # the launcher never had to kill a learner
