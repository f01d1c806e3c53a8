"""Row 2: trajectory segments through the Redis stream (SegmentProducer -> SegmentConsumer) against raw redis-py.

Both sides move the same payload bytes through the same ``LocalRedis``: gsrl adds protobuf encode/decode, the
back-pressure XLEN, the dedupe key and counters (Lua), and XDEL on acknowledge; the baseline is one XADD per
entry, XREADGROUP with the same count and one XACK per batch.
"""

from __future__ import annotations

import tempfile
import time
import uuid

import numpy as np
import redis
import torch

from bench.common import Row, Sizes, interleaved
from gsrl.redis_server import LocalRedis
from gsrl.stream import SEGMENT_FIELD, SegmentConsumer, SegmentProducer, StreamKeys, segment_to_proto
from gsrl.trajectory import Segment

STATE_DIM, ACTION_DIM, CHUNK, SEGMENT_LENGTH = 46, 7, 1, 16  # configs/state_ppo.yaml
READ_COUNT = 16  # learner.segments_per_update


def make_segment(index: int) -> Segment:
    rng = np.random.default_rng(index)
    t = SEGMENT_LENGTH
    return Segment(
        observations={"state": torch.from_numpy(rng.standard_normal((t, STATE_DIM), dtype=np.float32))},
        action_chunks=torch.from_numpy(rng.standard_normal((t, CHUNK, ACTION_DIM), dtype=np.float32)),
        logprobs=torch.randn(t),
        values=torch.randn(t),
        rewards=torch.randn(t),
        terminated=torch.zeros(t, dtype=torch.bool),
        truncated=torch.zeros(t, dtype=torch.bool),
        next_values=torch.randn(t),
        policy_versions=torch.zeros(t, dtype=torch.int64),
        instructions=["pick up the cube and put it on the plate"] * t,
        segment_id=uuid.uuid4().hex,
        env_key=f"bench/{index}",
    )


def _time(fn) -> float:
    start = time.perf_counter()
    moved = fn()
    return moved / (time.perf_counter() - start)


def run(sizes: Sizes) -> list[Row]:
    n = sizes.transport_segments
    with tempfile.TemporaryDirectory(prefix="gsrl-bench-redis-") as data_dir, LocalRedis(data_dir) as server:
        client = redis.Redis(port=server.port)
        try:
            return _run(client, n, sizes.repeats)
        finally:
            client.close()


def _run(client: redis.Redis, n: int, repeats: int) -> list[Row]:
    segments = [make_segment(i) for i in range(n)]
    # Segment ids stay fixed so the bytes match; the dedupe key is per prefix, and every repeat uses a new prefix.
    payloads = [segment_to_proto(s).SerializeToString() for s in segments]
    total_bytes = float(sum(len(p) for p in payloads))

    def through_gsrl() -> float:
        client.flushdb()
        keys = StreamKeys(f"bench{uuid.uuid4().hex[:8]}")
        producer = SegmentProducer(client, keys, max_len=n + 1)
        consumer = SegmentConsumer(client, keys, "learners", "rank0")

        def move() -> float:
            for segment in segments:
                producer.append(segment)
            got = 0
            while got < n:
                entries = consumer.read(READ_COUNT, block_ms=1000)
                consumer.acknowledge([e.entry_id for e in entries])
                got += len(entries)
            return total_bytes

        return _time(move)

    def through_redis_py() -> float:
        client.flushdb()
        stream = f"raw{uuid.uuid4().hex[:8]}"
        client.xgroup_create(stream, "learners", id="0", mkstream=True)

        def move() -> float:
            for payload in payloads:
                client.xadd(stream, {SEGMENT_FIELD: payload})
            got = 0
            while got < n:
                reply = client.xreadgroup("learners", "rank0", {stream: ">"}, count=READ_COUNT, block=1000)
                ids = [entry_id for _s, items in reply or [] for entry_id, _fields in items]
                if ids:
                    client.xack(stream, "learners", *ids)
                got += len(ids)
            return total_bytes

        return _time(move)

    through_gsrl()  # warm-up: script loading, first allocation in redis
    g, b = interleaved(through_gsrl, through_redis_py, repeats)
    seg_kib = total_bytes / n / 1024
    return [
        Row(
            "trajectory transport",
            f"append+read+ack, {n} segments of {seg_kib:.1f} KiB (vs XADD+XREADGROUP+XACK)",
            g / 1e6,
            b / 1e6,
            "MB/s",
            goal=">= 0.8",
        )
    ]
