"""Row 6: total env steps/s of N env processes stepping at once, against N times the rate of one.

Each process is a ``bench._env_worker``: ``EnvBatch`` of ``PutCubeOnPlate-v0`` (state observations, the env count
and controller of ``configs/state_ppo.yaml``), random actions, OMP_NUM_THREADS=1, as one env server runs. All N
step over the same window; the 1-process rate comes from the same pool in the same run. A ratio of 1 is perfect
scaling; on a host with C cores, N > C processes share them and cannot reach it.
"""

from __future__ import annotations

import os
import statistics

from bench.common import Row, Sizes
from bench.workers import EnvWorkers, total_rate

CONFIG = "state_ppo"
STAGE = "env scaling"


def run(sizes: Sizes) -> list[Row]:
    counts = sizes.scaling_processes
    cpus = os.cpu_count() or 1
    totals: dict[int, list[float]] = {n: [] for n in counts}
    with EnvWorkers(max(counts), CONFIG) as workers:
        workers.run(1, min(1.0, sizes.scaling_window_s))  # warm-up of the one that sets the baseline
        for _ in range(sizes.repeats):
            for n in counts:
                totals[n].append(total_rate(workers.run(n, sizes.scaling_window_s)))
    one = statistics.median(totals[1]) if 1 in totals else statistics.median(totals[counts[0]]) / counts[0]
    rows = []
    for n in counts:
        note = f"{cpus} cores here: {n} processes cannot scale past {cpus}x" if n > cpus else ""
        rows.append(
            Row(
                STAGE,
                f"{n} env process{'es' if n > 1 else ''}, total steps/s (vs {n} x the 1-process rate)",
                statistics.median(totals[n]),
                n * one,
                "steps/s",
                note=note,
            )
        )
    return rows
