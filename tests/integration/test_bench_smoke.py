"""``python -m bench --smoke`` runs every stage and writes finite, positive figures for every row (never a speed goal).

It starts what the stages start: a redis-server, a gRPC server on loopback, ManiSkill envs, env worker processes,
weight subscriber processes on gloo and a whole ``gsrl train`` run, each for a few seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Every stage of the table, with the rows each must produce (a stage that fails becomes one skipped row).
ROWS = {
    "env server": 2,  # physics-only EnvBatch vs gymnasium; Gaussian-splat rendered vs physics-only
    "pipelined env stages": 2,  # K=2 vs K=1, plain and with a simulated inference delay
    "whole loop": 1,
    "policy server": 7,  # Act + p50/p99, then per rollout size: rate, batching efficiency, p50/p99
    "VLA policy server": 7,  # the same for the tiny VLA preset on the CPU, at 4 envs
    "trajectory transport": 4,
    "tensor codec": 2,
    "weight broadcast": 3,  # delivery, publish() wall time, the background snapshot
    "env scaling": 2,  # 1 and 2 processes in smoke mode
    "dataset decode": 1,
}


def test_bench_smoke_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["mode"] == "smoke"
    rows = report["rows"]
    assert {r["stage"] for r in rows} == set(ROWS)
    for stage, count in ROWS.items():
        stage_rows = [r for r in rows if r["stage"] == stage]
        assert len(stage_rows) == count, f"{stage}: {[r['metric'] for r in stage_rows]}"
        for row in stage_rows:
            assert row["skipped"] is None, f"{stage} was skipped: {row['skipped']}\n{proc.stderr[-3000:]}"
            for key in ("gsrl", "baseline", "ratio"):
                value = row[key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{stage} {key}={value}"
    markdown = (out / "bench.md").read_text()
    assert all(stage in markdown for stage in ROWS)
    assert "| stage" in proc.stdout  # the table is printed
