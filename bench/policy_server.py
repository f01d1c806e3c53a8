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
SPEC = EnvSpec({"state": ((STATE_DIM,), "float32")}, ACTION_DIM, "pick up the cube and put it on the plate")


def _report(step_id: int, states: np.ndarray) -> rollout_pb2.RolloutRequest:
    n = len(states)
    step = rollout_pb2.StepReport(
        step_id=step_id,
        observations=rollout_pb2.ObservationBatch(
            tensors=codec.encode_map({"state": states}), instructions=[SPEC.instruction] * n
        ),
        env_steps=n * CHUNK,
    )
    if step_id > 0:  # every later report carries the last chunk's outcome, as an env server's does
        step.rewards.CopyFrom(codec.encode(np.ones(n, np.float32)))
        step.terminated.CopyFrom(codec.encode(np.zeros(n, bool)))
        step.truncated.CopyFrom(codec.encode(np.zeros(n, bool)))
    return rollout_pb2.RolloutRequest(step=step)


def _stream(stub, num_envs: int, steps: int, latencies: list[float], seed: int) -> None:
    """One env server's stream: ``steps`` reports, each sent when the previous answer came back."""
    states = np.random.default_rng(seed).standard_normal((num_envs, STATE_DIM), dtype=np.float32)
    reports = [_report(i, states) for i in range(steps)]  # encoded up front: the client's cost is not the server's
    answered: queue.Queue[None] = queue.Queue()
    sent_at: list[float] = []

    def requests() -> Iterator[rollout_pb2.RolloutRequest]:
        yield rollout_pb2.RolloutRequest(
            hello=rollout_pb2.RolloutHello(
                env_server_id=f"bench-{seed}", task=TASK, num_envs=num_envs, action_dim=ACTION_DIM, action_chunk=CHUNK
            )
        )
        for report in reports:
            sent_at.append(time.perf_counter())
            yield report
            answered.get()

    for _response in stub.Rollout(requests()):
        latencies.append(time.perf_counter() - sent_at[-1])
        answered.put(None)


def _rollout(address: str, envs: int, streams: int, steps: int) -> tuple[float, list[float]]:
    """Decisions/s (env rows answered) of ``streams`` concurrent streams, and every report's round trip (s)."""
    latencies: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        threads = [
            threading.Thread(target=_stream, args=(stub, envs // streams, steps, latencies, i)) for i in range(streams)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    return envs * steps / elapsed, latencies


def _act(address: str, calls: int) -> tuple[float, list[float]]:
    observation = codec.encode_map({"state": np.zeros(STATE_DIM, np.float32)})
    request = rollout_pb2.ActRequest(observation=observation, instruction=SPEC.instruction)
    latencies = []
    with grpc.insecure_channel(address) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        stub.Act(request)
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            stub.Act(request)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
    return calls / elapsed, latencies


def _forward(policy, batch: int, min_time_s: float) -> tuple[float, list[float]]:
    """In-process decisions/s at ``batch`` rows, and the time of each forward (s)."""
    observations = {"state": torch.randn(batch, STATE_DIM)}
    instructions = [SPEC.instruction] * batch
    times: list[float] = []

    def once() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            policy.act(observations, instructions)
        times.append(time.perf_counter() - t)
        return batch

    return rate(once, min_time_s), times


def run(sizes: Sizes) -> list[Row]:
    torch.manual_seed(0)
    policy_cfg, server_cfg = PolicyConfig(), PolicyServerConfig()
    policy = build_policy(policy_cfg.kind, SPEC.observation_spec, ACTION_DIM, CHUNK, **policy_cfg.kwargs())
    host = PolicyHost(policy)
    metrics = PolicyServerMetrics()
    batcher = InferenceBatcher(host, server_cfg.max_batch_size, server_cfg.max_wait_ms / 1000.0, metrics).start()
    servicer = PolicyServicer(batcher, SPEC, CHUNK, server_cfg.segment_length, None, metrics, TASK)
    max_streams = max(min(envs, 8) for envs in sizes.rollout_envs)
    grpc_server, port = build_grpc_server(servicer, "127.0.0.1:0", max_workers=max_streams + 4)
    grpc_server.start()
    address = f"127.0.0.1:{port}"
    try:
        return _run(address, host.policy, sizes)
    finally:
        grpc_server.stop(grace=1).wait()
        batcher.stop()


def _latency_rows(stage: str, label: str, served: list[float], forward: list[float]) -> list[Row]:
    return [
        Row(
            stage, f"{label} p{q} latency (vs forward)", percentile(served, q) * 1e3, percentile(forward, q) * 1e3, "ms"
        )
        for q in (50, 99)
    ]


def _run(address: str, policy, sizes: Sizes) -> list[Row]:
    stage = "policy server"
    rows: list[Row] = []
    act_lat: list[float] = []
    fwd1_lat: list[float] = []

    def act() -> float:
        r, lat = _act(address, sizes.act_calls)
        act_lat.extend(lat)
        return r

    def forward1() -> float:
        r, lat = _forward(policy, 1, sizes.min_time_s)
        fwd1_lat.extend(lat)
        return r

    act_rate, fwd1_rate = interleaved(act, forward1, sizes.repeats)
    rows.append(Row(stage, "Act, batch 1, gRPC (vs forward in-process)", act_rate, fwd1_rate, "decisions/s"))
    rows += _latency_rows(stage, "Act batch 1", act_lat, fwd1_lat)

    for envs in sizes.rollout_envs:
        streams = min(envs, 8)
        served_lat: list[float] = []
        fwd_lat: list[float] = []

        def rollout(envs=envs, streams=streams, served_lat=served_lat) -> float:
            r, lat = _rollout(address, envs, streams, sizes.rollout_steps)
            served_lat.extend(lat)
            return r

        def forward(envs=envs, fwd_lat=fwd_lat) -> float:
            r, lat = _forward(policy, envs, sizes.min_time_s)
            fwd_lat.extend(lat)
            return r

        served, fwd = interleaved(rollout, forward, sizes.repeats)
        label = f"Rollout, {envs} envs ({streams} streams x {envs // streams})"
        rows.append(Row(stage, f"{label} (vs forward at batch {envs})", served, fwd, "decisions/s"))
        rows.append(
            Row(
                stage,
                f"batching efficiency at {envs} envs: rate / (batch-1 rate x {envs})",
                served / (act_rate * envs),
                fwd / (fwd1_rate * envs),
                "fraction",
                note="gsrl: Rollout vs Act; baseline: forward at batch B vs batch 1",
            )
        )
        rows += _latency_rows(stage, f"Rollout {envs} envs", served_lat, fwd_lat)
    return rows
