"""Row 3: decisions/s of a real policy server over gRPC on loopback, against the same policy's forward in-process.

``Act`` is one observation per call from one client. Rollout runs ``streams`` concurrent bidi streams of
``envs / streams`` envs each, every stream a client thread that sends its next report when the answer to the last
arrives (as an env server does), so the ``InferenceBatcher`` merges rows across streams. No Redis: segments are
assembled and dropped (the transport row times Redis).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from bench.common import Row, Sizes, interleaved, percentile, rate
from gsrl import codec
from gsrl.config import PolicyConfig, PolicyServerConfig
from gsrl.env_spec import EnvSpec
from gsrl.metrics import PolicyServerMetrics
from gsrl.policy import build_policy
from gsrl.v1 import rollout_pb2, rollout_pb2_grpc
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import PolicyServicer, build_grpc_server

STATE_DIM, ACTION_DIM, CHUNK = 46, 7, 1
TASK = "PutCubeOnPlate-v0"
MAX_STREAMS = 8  # env servers feeding one policy server in the Rollout rows
MAX_MESSAGE_BYTES = 256 << 20  # 64 envs x 224x224 RGB is about 10 MB a report
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SPEC = EnvSpec({"state": ((STATE_DIM,), "float32")}, ACTION_DIM, "pick up the cube and put it on the plate")


@dataclass(frozen=True)
class Workload:
    """What a policy server is benchmarked with: the env spec it serves, its chunk, and random observations.

    The MLP row and the VLA rows (``bench.vla_policy``) share every measurement below through this, so the two
    tables time the same client behaviour.
    """

    spec: EnvSpec
    chunk: int
    task: str = TASK

    def observations(self, rows: int, seed: int) -> dict[str, np.ndarray]:
        """``rows`` random observations of the spec: uniform bytes for images, normal floats for states."""
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        for key, (shape, dtype) in self.spec.observation_spec.items():
            if dtype == "uint8":
                arrays[key] = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
            else:
                arrays[key] = rng.standard_normal((rows, *shape), dtype=np.float32).astype(dtype)
        return arrays


MLP_WORKLOAD = Workload(SPEC, CHUNK)


def _report(step_id: int, workload: Workload, observations: dict[str, np.ndarray]) -> rollout_pb2.RolloutRequest:
    n = len(next(iter(observations.values())))
    step = rollout_pb2.StepReport(
        step_id=step_id,
        observations=rollout_pb2.ObservationBatch(
            tensors=codec.encode_map(observations), instructions=[workload.spec.instruction] * n
        ),
        env_steps=n * workload.chunk,
    )
    if step_id > 0:  # every later report carries the last chunk's outcome, as an env server's does
        step.rewards.CopyFrom(codec.encode(np.ones(n, np.float32)))
        step.terminated.CopyFrom(codec.encode(np.zeros(n, bool)))
        step.truncated.CopyFrom(codec.encode(np.zeros(n, bool)))
    return rollout_pb2.RolloutRequest(step=step)


def _stream(stub, workload: Workload, num_envs: int, steps: int, latencies: list[float], seed: int) -> None:
    """One env server's stream: ``steps`` reports, each sent when the previous answer came back."""
    observations = workload.observations(num_envs, seed)
    reports = [_report(i, workload, observations) for i in range(steps)]  # encoded up front: not the server's cost
    answered: queue.Queue[None] = queue.Queue()
    sent_at: list[float] = []
    spec = workload.spec

    def requests() -> Iterator[rollout_pb2.RolloutRequest]:
        yield rollout_pb2.RolloutRequest(
            hello=rollout_pb2.RolloutHello(
                env_server_id=f"bench-{seed}",
                task=workload.task,
                num_envs=num_envs,
                action_dim=spec.action_dim,
                action_chunk=workload.chunk,
            )
        )
        for report in reports:
            sent_at.append(time.perf_counter())
            yield report
            answered.get()

    for _response in stub.Rollout(requests()):
        latencies.append(time.perf_counter() - sent_at[-1])
        answered.put(None)


def _rollout(address: str, workload: Workload, envs: int, streams: int, steps: int) -> tuple[float, list[float]]:
    """Decisions/s (env rows answered) of ``streams`` concurrent streams, and every report's round trip (s)."""
    latencies: list[float] = []
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        threads = [
            threading.Thread(target=_stream, args=(stub, workload, envs // streams, steps, latencies, i))
            for i in range(streams)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    return envs * steps / elapsed, latencies


def _act(address: str, workload: Workload, calls: int) -> tuple[float, list[float]]:
    single = {k: v[0] for k, v in workload.observations(1, 0).items()}
    request = rollout_pb2.ActRequest(observation=codec.encode_map(single), instruction=workload.spec.instruction)
    latencies = []
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        stub.Act(request)
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            stub.Act(request)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
    return calls / elapsed, latencies


def _forward(policy, workload: Workload, batch: int, min_time_s: float) -> tuple[float, list[float]]:
    """In-process decisions/s at ``batch`` rows (inputs already on the policy's device), and each forward's time (s).

    A CUDA forward is synchronized before its time is taken: ``act`` returns once its outputs are on the host, as
    the server's do, but the sync keeps a queued kernel from leaking into the next measurement.
    """
    device = next(policy.parameters()).device
    observations = {k: torch.from_numpy(v).to(device) for k, v in workload.observations(batch, 0).items()}
    instructions = [workload.spec.instruction] * batch
    times: list[float] = []

    def once() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            policy.act(observations, instructions)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        return batch

    return rate(once, min_time_s), times


@contextmanager
def serving(policy, workload: Workload, device: str = "cpu", max_batch_size: int | None = None) -> Iterator[str]:
    """A real policy server (batcher + gRPC servicer on loopback) around ``policy``; yields its address."""
    server_cfg = PolicyServerConfig()
    host = PolicyHost(policy, device=device)
    metrics = PolicyServerMetrics()
    batch = max_batch_size or server_cfg.max_batch_size
    batcher = InferenceBatcher(host, batch, server_cfg.max_wait_ms / 1000.0, metrics).start()
    servicer = PolicyServicer(batcher, workload.spec, workload.chunk, server_cfg.segment_length, None, metrics, TASK)
    grpc_server, port = build_grpc_server(
        servicer, "127.0.0.1:0", max_workers=MAX_STREAMS + 4, max_message_bytes=MAX_MESSAGE_BYTES
    )
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(grace=1).wait()
        batcher.stop()


def run(sizes: Sizes) -> list[Row]:
    torch.manual_seed(0)
    policy_cfg = PolicyConfig()
    policy = build_policy(policy_cfg.kind, SPEC.observation_spec, ACTION_DIM, CHUNK, **policy_cfg.kwargs())
    with serving(policy, MLP_WORKLOAD) as address:
        return measure("policy server", "", address, policy, MLP_WORKLOAD, sizes, sizes.rollout_envs)


def _latency_rows(stage: str, label: str, served: list[float], forward: list[float]) -> list[Row]:
    return [
        Row(
            stage, f"{label} p{q} latency (vs forward)", percentile(served, q) * 1e3, percentile(forward, q) * 1e3, "ms"
        )
        for q in (50, 99)
    ]


def measure(
    stage: str,
    prefix: str,
    address: str,
    policy,
    workload: Workload,
    sizes: Sizes,
    rollout_envs: tuple[int, ...],
    act_calls: int | None = None,
    rollout_steps: int | None = None,
) -> list[Row]:
    """Act at batch 1 and Rollout at each of ``rollout_envs``, each against the policy's forward in-process."""
    rows: list[Row] = []
    act_lat: list[float] = []
    fwd1_lat: list[float] = []
    calls = act_calls or sizes.act_calls

    def act() -> float:
        r, lat = _act(address, workload, calls)
        act_lat.extend(lat)
        return r

    def forward1() -> float:
        r, lat = _forward(policy, workload, 1, sizes.min_time_s)
        fwd1_lat.extend(lat)
        return r

    act_rate, fwd1_rate = interleaved(act, forward1, sizes.repeats)
    rows.append(Row(stage, f"{prefix}Act, batch 1, gRPC (vs forward in-process)", act_rate, fwd1_rate, "decisions/s"))
    rows += _latency_rows(stage, f"{prefix}Act batch 1", act_lat, fwd1_lat)

    for envs in rollout_envs:
        streams = min(envs, MAX_STREAMS)
        served_lat: list[float] = []
        fwd_lat: list[float] = []

        def rollout(envs=envs, streams=streams, served_lat=served_lat) -> float:
            r, lat = _rollout(address, workload, envs, streams, rollout_steps or sizes.rollout_steps)
            served_lat.extend(lat)
            return r

        def forward(envs=envs, fwd_lat=fwd_lat) -> float:
            r, lat = _forward(policy, workload, envs, sizes.min_time_s)
            fwd_lat.extend(lat)
            return r

        served, fwd = interleaved(rollout, forward, sizes.repeats)
        label = f"{prefix}Rollout, {envs} envs ({streams} streams x {envs // streams})"
        rows.append(Row(stage, f"{label} (vs forward at batch {envs})", served, fwd, "decisions/s"))
        rows.append(
            Row(
                stage,
                f"{prefix}batching efficiency at {envs} envs: rate / (batch-1 rate x {envs})",
                served / (act_rate * envs),
                fwd / (fwd1_rate * envs),
                "fraction",
                note="gsrl: Rollout vs Act; baseline: forward at batch B vs batch 1",
            )
        )
        rows += _latency_rows(stage, f"{prefix}Rollout {envs} envs", served_lat, fwd_lat)
    return rows
