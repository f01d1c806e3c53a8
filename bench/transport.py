"""Row 4: trajectory segments through the Redis stream (SegmentProducer -> SegmentConsumer) against raw redis-py.

Both sides move the same payload bytes through the same ``LocalRedis`` and read them with XREADGROUP, COUNT 16 (a
learner's ``segments_per_update``). gsrl adds the protobuf encode and decode of every segment, the back-pressure
length check, the at-most-once dedupe key and the counters (one Lua call per batch), and XDEL on acknowledge. The
baseline XADDs the pre-encoded payloads and XACKs each batch. Four figures:

- ``append``, one call per segment (how a policy server stores a segment today), against one XADD per entry;
- ``append_many``, 16 segments per call (the segments of all envs of one stream complete at the same step),
  against the same raw XADD per entry: the issue's baseline;
- the same against 16 XADDs per pipelined round trip: the same batching on both sides, the strictest baseline;
- that again with image-sized segments (RGB observations as the Gaussian-splat task renders them), where moving
  bytes rather than Python per field sets the pace.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis
import torch

from bench.common import Row, Sizes, interleaved
from gsrl.redis_server import LocalRedis
from gsrl.stream import SEGMENT_FIELD, SegmentConsumer, SegmentProducer, StreamKeys, segment_to_bytes
from gsrl.trajectory import Segment

STATE_DIM, ACTION_DIM, CHUNK, SEGMENT_LENGTH = 46, 7, 1, 16  # configs/state_ppo.yaml
IMAGE = (3, 128, 128)  # one camera, uint8, per step
READ_COUNT = 16  # learner.segments_per_update
BATCH = 16  # segments per append_many / per pipelined round trip
STAGE = "trajectory transport"


def make_segment(index: int, image: bool = False) -> Segment:
    rng = np.random.default_rng(index)
    t = SEGMENT_LENGTH
    observations = {"state": torch.from_numpy(rng.standard_normal((t, STATE_DIM), dtype=np.float32))}
    if image:
        observations["rgb"] = torch.from_numpy(rng.integers(0, 255, (t, *IMAGE), dtype=np.uint8))
    return Segment(
        observations=observations,
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


def _rate(setup: Callable[[], Callable[[], float]], min_time_s: float) -> float:
    """Bytes/s over timed moves (each on a fresh stream made by ``setup``, untimed) adding up to ``min_time_s``."""
    moved = elapsed = 0.0
    while elapsed < min_time_s or not moved:
        move = setup()
        start = time.perf_counter()
        moved += move()
        elapsed += time.perf_counter() - start
    return moved / elapsed


def run(sizes: Sizes) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="gsrl-bench-redis-") as data_dir, LocalRedis(data_dir) as server:
        client = redis.Redis(port=server.port)
        try:
            n = sizes.transport_segments
            small = [make_segment(i) for i in range(n)]
            images = [make_segment(i, image=True) for i in range(max(BATCH, n // 8))]
            one, many = "append, 1 per call", f"append_many, {BATCH} per call"
            per_entry, pipelined = "XADD per entry", f"{BATCH} XADD per pipeline"
            return [
                _row(client, small, (1, 1), sizes, one, per_entry),
                _row(client, small, (BATCH, 1), sizes, many, per_entry),
                _row(client, small, (BATCH, BATCH), sizes, many, pipelined),
                _row(client, images, (BATCH, BATCH), sizes, many, pipelined),
            ]
        finally:
            client.close()


def _row(
    client: redis.Redis, segments: list[Segment], batch: tuple[int, int], sizes: Sizes, gsrl: str, raw: str
) -> Row:
    """``batch``: segments per gsrl append call, and XADDs per raw round trip."""
    n = len(segments)
    # Segment ids stay fixed so the bytes match; the dedupe key is per prefix, and every repeat uses a new prefix.
    payloads = [segment_to_bytes(s) for s in segments]  # the bytes the producer stores
    total_bytes = float(sum(len(p) for p in payloads))

    def batches(size: int) -> list[range]:
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def through_gsrl() -> Callable[[], float]:
        client.flushdb()
        keys = StreamKeys(f"bench{uuid.uuid4().hex[:8]}")
        producer = SegmentProducer(client, keys, max_len=n + 1)
        consumer = SegmentConsumer(client, keys, "learners", "rank0")

        def move() -> float:
            for indices in batches(batch[0]):
                if batch[0] == 1:
                    producer.append(segments[indices[0]])
                else:
                    producer.append_many([segments[i] for i in indices])
            got = 0
            while got < n:
                entries = consumer.read(READ_COUNT, block_ms=1000)
                consumer.acknowledge([e.entry_id for e in entries])
                got += len(entries)
            return total_bytes

        return move

    def through_redis_py() -> Callable[[], float]:
        client.flushdb()
        stream = f"raw{uuid.uuid4().hex[:8]}"
        client.xgroup_create(stream, "learners", id="0", mkstream=True)

        def move() -> float:
            for indices in batches(batch[1]):
                if batch[1] == 1:
                    client.xadd(stream, {SEGMENT_FIELD: payloads[indices[0]]})
                else:
                    with client.pipeline(transaction=False) as pipe:
                        for i in indices:
                            pipe.xadd(stream, {SEGMENT_FIELD: payloads[i]})
                        pipe.execute()
            got = 0
            while got < n:
                reply = client.xreadgroup("learners", "rank0", {stream: ">"}, count=READ_COUNT, block=1000)
                ids = [entry_id for _s, items in reply or [] for entry_id, _fields in items]
                if ids:
                    client.xack(stream, "learners", *ids)
                got += len(ids)
            return total_bytes

        return move

    through_gsrl()(), through_redis_py()()  # warm-up: script loading, first allocations in redis
    g, b = interleaved(
        lambda: _rate(through_gsrl, sizes.min_time_s), lambda: _rate(through_redis_py, sizes.min_time_s), sizes.repeats
    )
    size = total_bytes / n / 1024
    size_text = f"{size / 1024:.2f} MiB" if size >= 1024 else f"{size:.1f} KiB"
    return Row(
        STAGE,
        f"{gsrl} + read + ack, {n} segments of {size_text} (vs {raw} + XREADGROUP + XACK)",
        g / 1e6,
        b / 1e6,
        "MB/s",
        goal=">= 0.8",
    )
