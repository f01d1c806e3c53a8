"""Pipelined env stages: env steps/s of one env server split into 2 stages, against the same envs in 1 stage.

One env server process (a worker started by this module, ``python -m bench.pipeline --worker``) holds both layouts
of ``configs/state_ppo.yaml``'s task: N envs in one ``EnvBatch`` (``env_server.pipeline_stages=1``) and the same N
envs, seeded the same, as two batches of N/2 (``pipeline_stages=2``). Both stream to one real policy server in this
process (gRPC on loopback, the run config's policy and batching, no Redis: segments are assembled and dropped) and
step in alternating windows of the same run, so background load hits both alike. The env server is a process of
its own, as in a run: ManiSkill's physics holds the GIL, which would otherwise stall the policy server's threads.

When the gain shows: with one stage an env server's cycle is physics then the policy round trip (P + L), and it
idles during L; with two it steps one stage while the policy server infers for the other, so a cycle takes about
max(P, P/2 + L) and the gain (P + L) / max(P, P/2 + L) is at most 1.5x, reached at L = P/2. With the MLP policy on
the CPU, L is mostly the policy server's batching wait (``policy_server.max_wait_ms``, which one env server's
stream never fills) and gRPC: the forward takes well under a millisecond. The second row adds a *simulated*
inference time (a ``time.sleep`` in ``policy.act``, bench only, ``SIMULATED_INFERENCE_MS``), the order of a VLA's
action chunk on a GPU: once L passes P/2, the gain needs more physics per stage (more envs, longer chunks). When a
stage's physics takes less than ``max_wait_ms``, both stages' reports land in one inference batch (the note's rows
per batch: N, not N/2) and the stages step in lock-step, which keeps only part of the gain. The idle fraction in
the note is the time the env server's stepping thread waited with no actions to step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import Row, Sizes, interleaved
from gsrl.cli import resolve_config_path
from gsrl.config import Config, load_config
from gsrl.env_spec import probe_env_spec
from gsrl.metrics import PolicyServerMetrics
from gsrl.policy import build_policy
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import PolicyServicer, build_grpc_server

STAGE = "pipelined env stages"
CONFIG = "state_ppo"
# Simulated inference time of the second row (bench only): the order of a VLA's action chunk on a GPU, and about
# the physics time of one chunk of 4 envs here.
SIMULATED_INFERENCE_MS = 10.0


@dataclass(frozen=True)
class _Plan:
    envs: tuple[int, ...]  # env counts per env server to measure (each split into 2 stages)
    window_s: float  # each layout steps for this long per repeat
    warmup_s: float  # after the first steps of a layout, before its window opens


# Sizes is shared with the other stages; this stage's own extents follow its mode's name.
_PLANS = {
    "smoke": _Plan(envs=(4,), window_s=1.0, warmup_s=0.3),
    "default": _Plan(envs=(4,), window_s=2.5, warmup_s=0.5),  # configs/state_ppo.yaml's env server
    "full": _Plan(envs=(4, 8, 16), window_s=8.0, warmup_s=1.0),
}


def _load(envs: int) -> Config:
    return load_config(resolve_config_path(CONFIG), [f"env_server.num_envs={envs}"])


class _SlowedAct:
    """``policy.act`` plus an adjustable sleep: stands in for a slower model without using more CPU."""

    def __init__(self, act: Callable[..., Any]) -> None:
        self.act = act
        self.delay_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        return self.act(*args, **kwargs)


class _Worker:
    """The env server process: both layouts built once; ``run(stages, seconds)`` steps one of them for a window."""

    def __init__(self, address: str, envs: int) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close(), after the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.pipeline", "--worker", "--address", address, "--envs", str(envs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            self._reply()  # {"ready": true}
        except BaseException:
            self.close()
            raise

    def run(self, stages: int, seconds: float, warmup_s: float) -> dict[str, float]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {stages} {seconds} {warmup_s}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()

    def _reply(self) -> dict[str, float]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read()[-3000:]
            raise RuntimeError(f"pipeline worker exited ({self.process.wait()}):\n{tail}")
        return json.loads(line)


def run(sizes: Sizes) -> list[Row]:
    plan = _PLANS.get(sizes.name, _PLANS["default"])
    config = _load(max(plan.envs))
    spec = probe_env_spec(config.task)
    torch.manual_seed(config.run.seed)
    policy = build_policy(
        config.policy.kind, spec.observation_spec, spec.action_dim, config.policy.action_chunk, **config.policy.kwargs()
    )
    slowed = _SlowedAct(policy.act)
    policy.act = slowed  # type: ignore[method-assign]  # an instance attribute: PolicyHost calls policy.act
    ps = config.policy_server
    host = PolicyHost(policy)
    metrics = PolicyServerMetrics()
    batcher = InferenceBatcher(host, ps.max_batch_size, ps.max_wait_ms / 1000.0, metrics).start()
    servicer = PolicyServicer(
        batcher, spec, config.policy.action_chunk, ps.segment_length, None, metrics, config.task.id
    )
    grpc_server, port = build_grpc_server(servicer, "127.0.0.1:0", max_workers=8)
    grpc_server.start()
    rows: list[Row] = []
    try:
        for envs in plan.envs:
            worker = _Worker(f"127.0.0.1:{port}", envs)
            try:
                for delay_ms in (0.0, SIMULATED_INFERENCE_MS):
                    slowed.delay_s = delay_ms / 1000.0
                    rows.append(_measure(worker, envs, delay_ms, plan, sizes.repeats, metrics))
            finally:
                worker.close()
    finally:
        grpc_server.stop(grace=1).wait()
        batcher.stop()
    return rows


def _measure(
    worker: _Worker, envs: int, delay_ms: float, plan: _Plan, repeats: int, metrics: PolicyServerMetrics
) -> Row:
    idle: dict[int, list[float]] = {1: [], 2: []}
    rows_per_batch: dict[int, list[float]] = {1: [], 2: []}

    def batches() -> tuple[float, float]:
        sample = metrics.registry.get_sample_value
        return sample("gsrl_policy_inference_batch_size_sum") or 0.0, sample(
            "gsrl_policy_inference_batch_size_count"
        ) or 0.0

    def layout(stages: int) -> Callable[[], float]:
        def once() -> float:
            rows_before, count_before = batches()
            reply = worker.run(stages, plan.window_s, plan.warmup_s)
            rows_after, count_after = batches()
            idle[stages].append(reply["idle"] / reply["seconds"])
            rows_per_batch[stages].append((rows_after - rows_before) / max(count_after - count_before, 1.0))
            return reply["steps"] / reply["seconds"]

        return once

    two, one = interleaved(layout(2), layout(1), repeats)
    inference = f"simulated {delay_ms:g} ms inference (sleep in policy.act)" if delay_ms else "MLP policy, no delay"
    return Row(
        STAGE,
        f"{envs} envs in 2 stages x {envs // 2} (vs 1 stage), {inference}",
        two,
        one,
        "steps/s",
        note=(
            f"env server idle {statistics.median(idle[2]):.0%} vs "
            f"{statistics.median(idle[1]):.0%}; "
            f"rows per inference batch {statistics.median(rows_per_batch[2]):.1f} vs "
            f"{statistics.median(rows_per_batch[1]):.1f}"
        ),
    )


# ---------------------------------------------------------------------------------------------- the worker process


def _serve_windows(address: str, envs: int) -> int:
    """Build both layouts, then answer ``run STAGES SECONDS WARMUP`` with one JSON line each until ``quit``."""
    import logging

    from services.env_server.core import EnvBatch
    from services.env_server.server import EnvServer

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # as an env server runs: one core for physics
    config = _load(envs)
    seed = config.run.seed * 1000  # env server index 0
    layouts: dict[int, list[EnvBatch]] = {}
    try:
        for stages in (1, 2):
            per = envs // stages
            layouts[stages] = [EnvBatch.for_task(config.task, per, seed=seed, first_env=k * per) for k in range(stages)]
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            stages, window_s, warmup_s = int(command[1]), float(command[2]), float(command[3])
            server = EnvServer(
                layouts[stages],
                address,
                f"bench-pipeline-k{stages}",
                config.task.id,
                config.policy.action_chunk,
                log_every_s=1e9,
            )
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 60
            while server.total_steps == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(warmup_s)  # the first steps build SAPIEN's caches; the streams settle
            steps, idle, start = server.total_steps, server.idle_seconds, time.perf_counter()
            time.sleep(window_s)
            steps, idle = server.total_steps - steps, server.idle_seconds - idle
            seconds = time.perf_counter() - start
            server.stop()
            thread.join(10)
            print(json.dumps({"steps": steps, "seconds": seconds, "idle": idle}), flush=True)
    finally:
        for batches in layouts.values():
            for batch in batches:
                batch.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """This stage alone (``python -m bench.pipeline [--sizes full] [--env-counts 2 4 8]``), or its worker."""
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    parser.add_argument("--worker", action="store_true", help="run as the env server process of this stage")
    parser.add_argument("--address", default="127.0.0.1:50051", help="worker: the policy server")
    parser.add_argument("--envs", type=int, default=4, help="worker: envs of the env server")
    parser.add_argument("--sizes", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--env-counts", type=int, nargs="*", help="env counts to measure instead of the plan's")
    args = parser.parse_args(argv)
    if args.worker:
        return _serve_windows(args.address, args.envs)
    from bench.common import SIZES

    sizes = SIZES[args.sizes]
    if args.env_counts:
        plan = _PLANS[args.sizes]
        _PLANS[args.sizes] = _Plan(tuple(args.env_counts), plan.window_s, plan.warmup_s)
    for row in run(sizes):
        print(f"{row.metric}: {row.gsrl:.1f} vs {row.baseline:.1f} {row.unit} ({row.ratio:.2f}x); {row.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
