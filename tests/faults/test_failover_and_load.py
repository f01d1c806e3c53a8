"""A policy server dies while another serves: env servers move over. 64 concurrent streams on one policy server."""

from __future__ import annotations

import re
import threading
import time

import grpc
import numpy as np
import pytest
import redis
from _fakes import CHUNK, TASK, FakeEnvBatch, PolicyServerUnderTest, hello, report, states

from gsrl.metrics import EnvServerMetrics
from gsrl.stream import read_counter
from gsrl.v1 import rollout_pb2_grpc
from services.env_server.server import EnvServer

pytestmark = pytest.mark.integration


def _steps_after(batch: FakeEnvBatch, count: int, timeout_s: float) -> float:
    """Seconds until ``batch`` has stepped ``count`` more chunks (fails after ``timeout_s``)."""
    start, target = time.monotonic(), len(batch.stepped) + count
    while len(batch.stepped) < target:
        assert time.monotonic() - start < timeout_s, f"no steps within {timeout_s}s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("form", ["list", "ipv4-target"])
def test_env_server_moves_to_the_other_policy_server(redis_client: redis.Redis, form: str) -> None:
    first, second = PolicyServerUnderTest(redis_client, "fo-a"), PolicyServerUnderTest(redis_client, "fo-b")
    # "ipv4:a,b" is what dns:/// resolves a headless Service to: one target, several A records
    address = f"{first.address},{second.address}" if form == "list" else f"ipv4:{first.address},{second.address}"
    batch = FakeEnvBatch()
    metrics = EnvServerMetrics()
    env = EnvServer(batch, address, "env-fo", TASK, CHUNK, metrics, backoff_s=0.2, max_backoff_s=1.0)
    thread = threading.Thread(target=env.run, daemon=True)
    thread.start()
    try:
        _steps_after(batch, 5, 10)
        serving = first if first.metrics.streams._value.get() == 1 else second
        other = second if serving is first else first
        serving.stop()  # the pod is killed: its streams break
        moved_in = _steps_after(batch, 5, 10)
        print(f"{form}: moved to the other policy server, stepping again after {moved_in:.2f}s")
        assert other.metrics.streams._value.get() == 1
        assert read_counter(redis_client, other.keys.produced) > 0
    finally:
        env.stop()
        thread.join(10)
        first.stop()
        second.stop()


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


@pytest.mark.timeout(120)
def test_64_concurrent_streams(redis_client: redis.Redis) -> None:
    streams, num_envs, duration_s = 64, 2, 20.0
    server = PolicyServerUnderTest(redis_client, "load", max_workers=streams + 8)
    stop = threading.Event()
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(streams)]
    steps = [0] * streams

    def client(i: int) -> None:
        import queue

        outgoing: queue.Queue = queue.Queue()
        outgoing.put(hello(num_envs, env_id=f"load-{i}"))
        outgoing.put(report(0, states(num_envs, i), with_rewards=False))

        def requests():
            while (item := outgoing.get()) is not None:
                yield item

        try:
            with grpc.insecure_channel(server.address) as channel:
                sent = time.monotonic()
                call = rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(requests())
                for response in call:
                    latencies[i].append(time.monotonic() - sent)
                    steps[i] += 1
                    if stop.is_set():
                        break
                    sent = time.monotonic()
                    outgoing.put(report(response.actions.step_id, states(num_envs, steps[i])))
                outgoing.put(None)
                call.cancel()
        except grpc.RpcError as exc:
            if not stop.is_set() or exc.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"stream {i}: {exc.code()} {exc.details()}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    try:
        for t in threads:
            t.start()
        time.sleep(duration_s / 4)  # warm-up
        rss_warm, steps_warm = _rss_kib(), sum(steps)
        time.sleep(duration_s * 3 / 4)
        rss_end, steps_end = _rss_kib(), sum(steps)
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        stop.set()
        server.stop()
    all_latencies = np.array([x for per in latencies for x in per[5:]])
    p50, p99 = np.percentile(all_latencies, [50, 99]) * 1000
    batch_hist = server.metrics.registry.get_sample_value
    mean_batch = batch_hist("gsrl_policy_inference_batch_size_sum") / max(
        batch_hist("gsrl_policy_inference_batch_size_count") or 0, 1
    )
    produced = read_counter(redis_client, server.keys.produced)
    rate = (steps_end - steps_warm) / (duration_s * 0.75)
    print(
        f"\n64 streams x {num_envs} envs, {duration_s:.0f}s: {steps_end} round trips ({rate:.0f}/s "
        f"after warm-up), round-trip p50 {p50:.1f} ms p99 {p99:.1f} ms, mean batch {mean_batch:.1f} rows, "
        f"segments {produced}, RSS {rss_warm / 1024:.0f} -> {rss_end / 1024:.0f} MiB"
    )
    assert errors == []
    assert all(s > 5 for s in steps), steps
    assert rss_end - rss_warm < 64 * 1024, (rss_warm, rss_end)  # flat: under 64 MiB of growth after warm-up
