"""``python -m bench --smoke`` runs every implemented stage and writes finite, positive figures (never a speed goal).

It lives with the unit tests because it is quick, but it starts a redis-server, a gRPC server on loopback and a
ManiSkill env, like the integration tier.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPLEMENTED = ("tensor codec", "trajectory transport", "policy server", "env server")


def test_bench_smoke_writes_every_implemented_row(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["mode"] == "smoke"
    rows = report["rows"]
    for stage in IMPLEMENTED:
        stage_rows = [r for r in rows if r["stage"] == stage]
        assert stage_rows, f"no row for {stage}"
        for row in stage_rows:
            assert row["skipped"] is None, f"{stage} was skipped: {row['skipped']}"
            for key in ("gsrl", "baseline", "ratio"):
                value = row[key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{stage} {key}={value}"
    assert "trajectory transport" in (out / "bench.md").read_text()
    assert "| stage" in proc.stdout  # the table is printed
