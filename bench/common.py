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

    @property
    def goal_met(self) -> bool | None:
        """Whether ``ratio`` meets ``goal`` (">= 0.8", "<= 1.2"); None without a goal or a ratio."""
        ratio, parts = self.ratio, self.goal.split()
        if ratio is None or len(parts) != 2 or parts[0] not in (">=", "<="):
            return None
        bound = float(parts[1])
        return ratio >= bound if parts[0] == ">=" else ratio <= bound

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "goal_met": self.goal_met}


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
    weights_mib: int  # bytes of the published state dict
    weight_subscribers: int  # policy servers receiving each publish (NCCL: at most the GPUs but one)
    scaling_processes: tuple[int, ...]  # env process counts of the scaling row
    scaling_window_s: float  # each process count steps for this long (all processes over the same window)
    loop_overrides: tuple[str, ...]  # on top of configs/state_ppo.yaml, for the whole-loop run and its baseline
    loop_warmup_s: float  # after the first env steps are counted, before the window opens
    loop_window_s: float
    vla_presets: tuple[str, ...]  # VLA presets of the VLA policy-server rows (on a CPU box: tiny only)
    vla_envs: tuple[int, ...]  # Rollout batch sizes of those rows
    vla_act_calls: int
    vla_rollout_steps: int
    decode_episodes: int  # 224x224 episode videos the dataset-decode row decodes per timed pass


# The smallest whole loop that still runs every role (as tests/_tiny_run.py, which the bench cannot import).
_TINY_LOOP = (
    "env_server.num_servers=1",
    "env_server.num_envs=2",
    "policy.hidden_sizes=[32]",
    "policy_server.segment_length=4",
    "learner.segments_per_update=2",
    "redis.max_stream_len=8",
    "algo.update_epochs=1",
    "algo.num_minibatches=2",
)
SIZES = {
    "smoke": Sizes(
        name="smoke",
        repeats=1,
        min_time_s=0.05,
        codec_mib=4,
        transport_segments=16,
        rollout_envs=(16,),
        rollout_steps=5,
        act_calls=20,
        env_steps=10,
        weights_mib=4,
        weight_subscribers=2,
        scaling_processes=(1, 2),
        scaling_window_s=1.0,
        loop_overrides=_TINY_LOOP,
        loop_warmup_s=1.0,
        loop_window_s=3.0,
        vla_presets=("tiny",),
        vla_envs=(4,),
        vla_act_calls=5,
        vla_rollout_steps=3,
        decode_episodes=4,
    ),
    "default": Sizes(
        name="default",
        repeats=3,
        min_time_s=0.5,
        codec_mib=4,
        transport_segments=200,
        rollout_envs=(16, 64),
        rollout_steps=60,
        act_calls=300,
        env_steps=150,
        weights_mib=64,
        weight_subscribers=2,
        scaling_processes=(1, 2, 4),
        scaling_window_s=3.0,
        loop_overrides=(),  # configs/state_ppo.yaml as `make run` trains it: 2 env servers x 4 envs
        loop_warmup_s=5.0,
        loop_window_s=20.0,
        vla_presets=("tiny",),
        vla_envs=(16,),
        vla_act_calls=20,
        vla_rollout_steps=10,
        decode_episodes=32,
    ),
    "full": Sizes(
        name="full",
        repeats=5,
        min_time_s=2.0,
        codec_mib=64,
        transport_segments=1000,
        rollout_envs=(16, 64, 256),
        rollout_steps=200,
        act_calls=2000,
        env_steps=1000,
        weights_mib=1024,
        weight_subscribers=3,
        scaling_processes=(1, 2, 4, 8, 16),
        scaling_window_s=10.0,
        # The learner goes to the GPU there; the policy server stays on the CPU (its default), and NCCL cannot
        # reach a CPU subscriber, so the weights go over gloo, as the config's comment prescribes.
        loop_overrides=("env_server.num_servers=4", "learner.broadcast_backend=gloo"),
        loop_warmup_s=10.0,
        loop_window_s=60.0,
        vla_presets=("small", "pi05"),
        vla_envs=(16, 64),
        vla_act_calls=20,
        vla_rollout_steps=8,
        decode_episodes=256,
    ),
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
