"""Ctrl-C stops every process cleanly and checkpoints; a second `gsrl train` on the same run directory resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from _tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    *TINY_RUN,
    "run.log_every_s=1",
    "env_server.num_servers=1",
    "algo.max_policy_lag=4",
    "policy_server.metrics_port=0",
]


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gsrl.cli", "train", "-c", "state_ppo", "--run-dir", str(run_dir), *SMALL, *extra]


def leftover_processes(run_dir: Path) -> str:
    return subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.strip()


def test_sigint_stops_cleanly_then_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, "run.duration_s=600"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    updates = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("iter") and int(line.split()[1]) >= 2:
            updates = int(line.split()[1])
            break
        assert time.monotonic() < deadline, "no learner progress within 300 s"
    assert updates >= 2
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, rest
    assert "done:" in rest
    assert leftover_processes(run_dir) == "", "child processes survived Ctrl-C"
    first = json.loads((run_dir / "summary.json").read_text())
    stopped_at = int(first["learner"]["updates"])
    assert stopped_at >= updates
    # the interrupted learner saved a final checkpoint even though periodic checkpoints are off
    meta = json.loads(sorted((run_dir / "checkpoints").glob("update_*"))[-1].joinpath("meta.json").read_text())
    assert meta["updates"] >= stopped_at

    target = meta["updates"] + 2
    second = subprocess.run(
        train_command(run_dir, f"run.max_updates={target}", "run.duration_s=600"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert int(summary["learner"]["updates"]) == target
    assert int(summary["learner"]["policy_version"]) == target
    assert "resumed from" in (run_dir / "logs" / "learner-0.log").read_text()
    # counters live in the run's Redis (append-only file), so accounting spans both runs
    assert summary["segments_produced"] == (
        summary["segments_consumed"] + summary["segments_dropped"] + summary["segments_in_stream"]
    )
