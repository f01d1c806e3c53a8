"""Row 2: env steps/s of the whole loop as it trains, against the same envs and policy in-process, no transport.

gsrl: ``gsrl train -c state_ppo`` (the run ``make run`` starts, with the mode's overrides) as processes: a private
redis-server, the learner (DeepSpeed, PPO updates, weight broadcast), one policy server and S env servers of E
envs each. Env steps are counted by the policy server (``{prefix}:stats:env_steps``, which it publishes about once a
second); the rate is taken between two of those publications a window apart, after a warm-up that starts with the
first counted step, so start-up and the first compilation-like costs stay out.

Baseline: S processes (``bench._env_worker --policy``), each stepping the same ``EnvBatch`` (same task, E envs) with
chunks from the same policy's ``act`` on the whole batch, in a loop: what the env servers and the policy server
compute, minus gRPC, batching across streams, the Redis stream, the learner's CPU and the weight swaps. On a host
with fewer cores than processes, the learner and the policy server take CPU from the env servers: the ratio then
prices the services' CPU as well as their latency.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

from bench.common import Row, Sizes
from bench.workers import EnvWorkers, total_rate
from gsrl.cli import resolve_config_path
from gsrl.config import load_config
from gsrl.stream import StreamKeys

REPO = Path(__file__).resolve().parent.parent
CONFIG = "state_ppo"
STAGE = "whole loop"
START_TIMEOUT_S = 240.0  # until the first env step is counted: imports, DeepSpeed, ManiSkill, on a busy box
STOP_TIMEOUT_S = 240.0  # the launcher itself waits up to 30 + 30 + 120 s for the roles
POLL_S = 0.05
# No metrics ports (several runs may share a host), no periodic checkpoints; nothing ends the run but us.
RUN_OVERRIDES = (
    "run.name=bench",
    "run.duration_s=0",
    "run.max_updates=0",
    "run.log_every_s=3600",
    "learner.checkpoint_every=0",
    "learner.metrics_port=0",
    "env_server.metrics_port=0",
    "policy_server.metrics_port=0",
)


class _Counter:
    """The run's env-step counter, with the time each new value appeared (its publication, to ``POLL_S``)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.value, self.changed_at = 0, time.monotonic()

    def poll(self) -> bool:
        raw = self.client.get(self.key)  # a redis error here means the run is gone: _services reports why
        value = int(raw) if raw is not None else 0
        if value != self.value:
            self.value, self.changed_at = value, time.monotonic()
            return True
        return False

    def next_change(self, train: subprocess.Popen, timeout_s: float, log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.poll():
            if train.poll() is not None:
                raise RuntimeError(f"gsrl train exited with code {train.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no env steps counted within {timeout_s:.0f}s:\n{_tail(log)}")
            time.sleep(POLL_S)


def _tail(log: Path, chars: int = 3000) -> str:
    logs = [log, *sorted(log.parent.glob("run/logs/*.log"))]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs if p.is_file())


def _services(sizes: Sizes, tmp: Path) -> tuple[float, str]:
    """Env steps/s of ``gsrl train`` over the window, and a note on what the learner did meanwhile."""
    run_dir, log = tmp / "run", tmp / "train.log"
    args = [sys.executable, "-m", "gsrl.cli", "train", "-c", CONFIG, "--run-dir", str(run_dir)]
    args += [*sizes.loop_overrides, *RUN_OVERRIDES]
    with open(log, "w") as out:
        train = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    client = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (run_dir / "config.yaml").is_file():  # written once its redis-server is up
            if train.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gsrl train did not start (exit code {train.poll()}):\n{_tail(log)}")
            time.sleep(POLL_S)
        effective = yaml.safe_load((run_dir / "config.yaml").read_text())
        client = redis.Redis(port=int(effective["redis"]["port"]))
        prefix = effective["redis"]["key_prefix"]
        counter = _Counter(client, StreamKeys(prefix, effective["redis"]["stream"]).env_steps)
        counter.next_change(train, START_TIMEOUT_S, log)  # the first steps: everything is up
        time.sleep(sizes.loop_warmup_s)
        counter.next_change(train, 30.0, log)
        start_steps, start_at, start_updates = counter.value, counter.changed_at, _updates(client, prefix)
        while time.monotonic() - start_at < sizes.loop_window_s:
            time.sleep(POLL_S)
        counter.next_change(train, 30.0, log)
        steps, elapsed = counter.value - start_steps, counter.changed_at - start_at
        updates = _updates(client, prefix) - start_updates
        return steps / elapsed, f"{updates} learner updates in the {elapsed:.0f} s window"
    except redis.RedisError as exc:  # the launcher stops its redis-server when a role fails: say which and why
        with contextlib.suppress(subprocess.TimeoutExpired):
            train.wait(STOP_TIMEOUT_S)
        raise RuntimeError(f"lost the run's Redis ({exc}); gsrl train exit code {train.poll()}:\n{_tail(log)}") from exc
    finally:
        if client is not None:
            client.close()
        if train.poll() is None:
            train.send_signal(signal.SIGTERM)  # the launcher stops env servers, policy server, learner, redis
            try:
                train.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                train.kill()
                train.wait()


def _updates(client: redis.Redis, prefix: str) -> int:
    raw = client.hget(f"{prefix}:stats:learner", "updates")
    return int(raw) if raw is not None else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def run(sizes: Sizes) -> list[Row]:
    config = load_config(resolve_config_path(CONFIG), sizes.loop_overrides)
    servers, envs = config.env_server.num_servers, config.env_server.num_envs
    with tempfile.TemporaryDirectory(prefix="gsrl-bench-loop-") as tmp:
        services, note = _services(sizes, Path(tmp))
    with EnvWorkers(servers, CONFIG, sizes.loop_overrides, policy=True) as workers:
        workers.run(servers, min(1.0, sizes.loop_warmup_s))
        baseline = total_rate(workers.run(servers, sizes.loop_window_s))
    return [
        Row(
            STAGE,
            f"env steps/s, {_count(servers, 'env server')} x {_count(envs, 'env')} -> gRPC -> policy server -> "
            f"Redis -> learner (vs EnvBatch + policy.act in {_count(servers, 'process')}, no transport)",
            services,
            baseline,
            "steps/s",
            goal=">= 0.9",
            note=note,
        )
    ]
