"""What every stage shares: the row of the table, the sizes of a mode, and the interleaved timer."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One line of the table. ``ratio`` is gsrl / baseline in the row's unit (for a time, lower is better)."""

    stage: str
    metric: str
    gsrl: float | None
    baseline: float | None
    unit: str
    goal: str = ""
    note: str = ""
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.gsrl is None or not self.baseline:
            return None
        return self.gsrl / self.baseline

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def skipped_row(stage: str, reason: str) -> Row:
    return Row(stage, "-", None, None, "", skipped=reason)


@dataclass(frozen=True)
class Sizes:
    """How long and how big each stage runs; ``smoke`` for CI, ``default`` for this box, ``full`` for a GPU host."""

    name: str
    repeats: int  # gsrl/baseline pairs per figure; the median of each is reported
    min_time_s: float  # each timed repeat runs at least this long
    codec_mib: int
    transport_segments: int  # segments per repeat
    rollout_envs: tuple[int, ...]
    rollout_steps: int  # step reports per stream per repeat
    act_calls: int
    env_steps: int  # env steps per repeat


SIZES = {
    "smoke": Sizes("smoke", 1, 0.05, 4, 16, (16,), 5, 20, 10),
    "default": Sizes("default", 3, 0.5, 4, 200, (16, 64), 60, 300, 150),
    "full": Sizes("full", 5, 2.0, 64, 1000, (16, 64, 256), 200, 2000, 1000),
}


def rate(fn: Callable[[], float], min_time_s: float) -> float:
    """Units per second: ``fn`` runs once per loop and returns how many units it did; loop for ``min_time_s``.

    One untimed call first: lazy imports, allocator growth and first-touch page faults are not the steady state.
    """
    fn()
    units = 0.0
    start = time.perf_counter()
    while True:
        units += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return units / elapsed


def interleaved(gsrl: Callable[[], float], baseline: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Median of ``repeats`` alternating measurements of each, so background load hits both alike."""
    a, b = [], []
    for _ in range(repeats):
        a.append(gsrl())
        b.append(baseline())
    return statistics.median(a), statistics.median(b)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]
