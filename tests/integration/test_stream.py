"""The Redis trajectory stream against a real redis-server: round trip, acks, restarts, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import torch

from gsrl.stream import SegmentConsumer, SegmentProducer, StreamKeys, read_counter, segment_from_proto
from gsrl.trajectory import EpisodeSummary, Segment
from gsrl.v1 import trajectory_pb2


def make_segment(version: int = 0, length: int = 4) -> Segment:
    return Segment(
        observations={
            "state": torch.randn(length, 5),
            "rgb": torch.randint(0, 255, (length, 2, 2, 3), dtype=torch.uint8),
        },
        action_chunks=torch.randn(length, 2, 7),
        logprobs=torch.randn(length),
        values=torch.randn(length),
        rewards=torch.randn(length),
        terminated=torch.tensor([False] * (length - 1) + [True]),
        truncated=torch.zeros(length, dtype=torch.bool),
        next_values=torch.randn(length),
        policy_versions=torch.full((length,), version, dtype=torch.int64),
        instructions=["pick up the cube"] * length,
        episodes=[EpisodeSummary(1.5, 30, True)],
        env_key="env-0/1",
    )


def test_round_trip_preserves_every_field(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t1")
    SegmentProducer(redis_client, keys, max_len=10).append(original := make_segment(version=3))
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    (entry,) = consumer.read(10, block_ms=100)
    got = entry.segment
    for name in (
        "action_chunks",
        "logprobs",
        "values",
        "rewards",
        "terminated",
        "truncated",
        "next_values",
        "policy_versions",
    ):
        assert torch.equal(getattr(got, name), getattr(original, name)), name
    assert torch.equal(got.observations["rgb"], original.observations["rgb"])
    assert got.episodes == original.episodes and got.instructions == original.instructions
    assert got.policy_version == 3 and got.env_key == "env-0/1"


def test_ack_removes_and_counts(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t2")
    producer = SegmentProducer(redis_client, keys, max_len=10)
    for v in range(3):
        producer.append(make_segment(version=v))
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    entries = consumer.read(3, block_ms=100)
    assert len(entries) == 3 and redis_client.xlen(keys.stream) == 3  # read but not yet acknowledged
    consumer.acknowledge([entries[0].entry_id, entries[1].entry_id], dropped=[entries[2].entry_id])
    assert redis_client.xlen(keys.stream) == 0
    assert read_counter(redis_client, keys.produced) == 3
    assert read_counter(redis_client, keys.consumed) == 2
    assert read_counter(redis_client, keys.dropped) == 1


def test_restarted_consumer_rereads_unacknowledged_entries(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t3")
    producer = SegmentProducer(redis_client, keys, max_len=10)
    for v in range(4):
        producer.append(make_segment(version=v))
    first = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    taken = first.read(2, block_ms=100)
    # the process dies here: nothing acknowledged
    again = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    replay = again.read(10, block_ms=100)
    assert [e.entry_id for e in replay] == [e.entry_id for e in taken]
    rest = again.read(10, block_ms=100)
    assert [e.segment.policy_version for e in rest] == [2, 3]


def test_two_consumers_share_without_overlap(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t4")
    producer = SegmentProducer(redis_client, keys, max_len=20)
    for v in range(6):
        producer.append(make_segment(version=v))
    a = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    b = SegmentConsumer(redis_client, keys, "learners", "rank-1")
    got_a = a.read(3, block_ms=100)
    got_b = b.read(3, block_ms=100)
    versions = sorted(e.segment.policy_version for e in got_a + got_b)
    assert versions == list(range(6))


def test_malformed_entry_goes_to_dead_letters(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t5")
    redis_client.xadd(keys.stream, {b"seg": b"not a protobuf \xff\xff"})
    bad = make_segment()
    message = trajectory_pb2.TrajectorySegment()
    from gsrl.stream import segment_to_proto

    message.CopyFrom(segment_to_proto(bad))
    message.logprobs.data = message.logprobs.data[:-4]  # byte count no longer matches the shape
    redis_client.xadd(keys.stream, {b"seg": message.SerializeToString()})
    SegmentProducer(redis_client, keys, max_len=10).append(make_segment(version=7))
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    entries = consumer.read(10, block_ms=100)
    assert [e.segment.policy_version for e in entries] == [7]
    assert redis_client.xlen(keys.dead_letters) == 2
    assert read_counter(redis_client, keys.dropped) == 2


def test_segment_with_inconsistent_lengths_is_refused() -> None:
    from gsrl.stream import SegmentDecodeError, segment_to_proto

    segment = make_segment(length=4)
    segment.values = torch.zeros(3)
    with pytest.raises(SegmentDecodeError, match="'values'"):
        segment_from_proto(segment_to_proto(segment))


def test_back_pressure_waits_for_the_learner(redis_client: redis.Redis) -> None:
    keys = StreamKeys("t6")
    producer = SegmentProducer(redis_client, keys, max_len=2, poll_s=0.01)
    producer.append(make_segment())
    producer.append(make_segment())
    done = threading.Event()
    thread = threading.Thread(target=lambda: (producer.append(make_segment()), done.set()))
    thread.start()
    time.sleep(0.3)
    assert not done.is_set(), "a full stream must make the producer wait"
    assert redis_client.xlen(keys.stream) == 2
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    consumer.acknowledge([e.entry_id for e in consumer.read(1, block_ms=100)])
    assert done.wait(5), "the producer must continue once there is room"
    thread.join()
    assert redis_client.xlen(keys.stream) == 2 and producer.backpressure_s > 0.2
