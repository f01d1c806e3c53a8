"""Batched appends and payloads stored by reference, against a real redis-server.

``append_many`` stores a batch in one round trip, and payloads of ``inline_max_bytes`` or more go into their own
key with only the key name in the entry. Both must keep what ``append`` promises: order, at-most-once per segment
id, back-pressure, pending replay, dead letters, and nothing left behind once an entry is acknowledged.
"""

from __future__ import annotations

import threading
import time

import redis
import torch

from gsrl.stream import (
    PAYLOAD_REF_FIELD,
    SEGMENT_FIELD,
    SegmentConsumer,
    SegmentProducer,
    StreamKeys,
    read_counter,
    segment_to_proto,
)
from gsrl.trajectory import Segment

BIG = 1024  # inline_max_bytes for these tests: every segment below is stored by reference


def make_segment(version: int = 0, length: int = 4, segment_id: str = "") -> Segment:
    return Segment(
        observations={"rgb": torch.randint(0, 255, (length, 3, 8, 8), dtype=torch.uint8)},
        action_chunks=torch.randn(length, 1, 7),
        logprobs=torch.randn(length),
        values=torch.randn(length),
        rewards=torch.randn(length),
        terminated=torch.zeros(length, dtype=torch.bool),
        truncated=torch.zeros(length, dtype=torch.bool),
        next_values=torch.randn(length),
        policy_versions=torch.full((length,), version, dtype=torch.int64),
        instructions=["pick up the cube"] * length,
        segment_id=segment_id,
        env_key=f"env-0/{version}",
    )


def payload_keys(client: redis.Redis, keys: StreamKeys) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{keys.prefix}:payload:*"))


def test_referenced_payloads_round_trip_and_are_deleted_with_their_entries(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref1")
    producer = SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=BIG)
    originals = [make_segment(version=v) for v in range(3)]
    ids = producer.append_many(originals)
    assert all(ids) and ids == sorted(ids)
    (_id, fields), *_ = redis_client.xrange(keys.stream)
    assert SEGMENT_FIELD not in fields and PAYLOAD_REF_FIELD in fields
    stored = payload_keys(redis_client, keys)
    assert len(stored) == 3 and all(redis_client.ttl(k) == -1 for k in stored)  # persistent while referenced
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    entries = consumer.read(10, block_ms=100)
    assert [e.segment.policy_version for e in entries] == [0, 1, 2]
    assert torch.equal(entries[1].segment.observations["rgb"], originals[1].observations["rgb"])
    consumer.acknowledge([e.entry_id for e in entries[:2]], dropped=[entries[2].entry_id])
    assert redis_client.xlen(keys.stream) == 0 and payload_keys(redis_client, keys) == []
    assert read_counter(redis_client, keys.consumed) == 2 and read_counter(redis_client, keys.dropped) == 1


def test_small_and_large_payloads_mix_in_one_batch(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref2")
    limit = len(segment_to_proto(make_segment(length=2)).SerializeToString()) + 1
    producer = SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=limit)
    producer.append_many([make_segment(version=0, length=2), make_segment(version=1, length=8)])
    kinds = [SEGMENT_FIELD in fields for _id, fields in redis_client.xrange(keys.stream)]
    assert kinds == [True, False]
    entries = SegmentConsumer(redis_client, keys, "learners", "rank-0").read(10, block_ms=100)
    assert [e.segment.length for e in entries] == [2, 8]


def test_a_retried_batch_is_stored_once_even_after_it_was_consumed(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref3")
    producer = SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=BIG)
    batch = [make_segment(version=v, segment_id=f"seg-{v}") for v in range(2)]
    assert all(producer.append_many(batch))
    assert producer.append_many(batch) == [None, None]  # the reply was lost and the producer tried again
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    consumer.acknowledge([e.entry_id for e in consumer.read(10, block_ms=100)])
    assert producer.append_many(batch) == [None, None]  # a very late retry: still not stored twice
    assert redis_client.xlen(keys.stream) == 0 and read_counter(redis_client, keys.produced) == 2
    # what the late retry staged never got an entry: it expires instead of staying forever
    staged = payload_keys(redis_client, keys)
    assert len(staged) == 2 and all(redis_client.ttl(k) > 0 for k in staged)


def test_restarted_consumer_rereads_referenced_entries(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref4")
    SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=BIG).append_many(
        [make_segment(version=v) for v in range(3)]
    )
    taken = SegmentConsumer(redis_client, keys, "learners", "rank-0").read(2, block_ms=100)
    again = SegmentConsumer(redis_client, keys, "learners", "rank-0")  # the first one died unacknowledged
    replay = again.read(10, block_ms=100)
    assert [e.entry_id for e in replay] == [e.entry_id for e in taken]
    rest = again.read(10, block_ms=100)
    again.acknowledge([e.entry_id for e in replay + rest])
    assert [e.segment.policy_version for e in replay + rest] == [0, 1, 2]
    assert payload_keys(redis_client, keys) == []


def test_malformed_or_missing_referenced_payloads_go_to_dead_letters(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref5")
    producer = SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=BIG)
    producer.append_many([make_segment(version=v, segment_id=f"bad-{v}") for v in range(3)])
    redis_client.set(keys.payload("bad-0"), b"\x08\xff not a segment")
    redis_client.delete(keys.payload("bad-1"))
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    entries = consumer.read(10, block_ms=100)
    assert [e.segment.policy_version for e in entries] == [2]
    dead = redis_client.xrange(keys.dead_letters)
    assert len(dead) == 2 and b"missing" in dead[1][1][b"reason"]
    assert dead[0][1][b"seg"] == b"\x08\xff not a segment"  # the bad bytes are kept for a post-mortem
    assert read_counter(redis_client, keys.dropped) == 2
    assert payload_keys(redis_client, keys) == [keys.payload("bad-2").encode()]


def test_append_many_waits_for_room_and_keeps_order(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref6")
    producer = SegmentProducer(redis_client, keys, max_len=3, poll_s=0.01, inline_max_bytes=BIG)
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (producer.append_many([make_segment(version=v) for v in range(5)]), done.set())
    )
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and redis_client.xlen(keys.stream) == 3  # the first three fit, the rest wait
    versions = []
    while len(versions) < 5:
        entries = consumer.read(2, block_ms=1000)
        consumer.acknowledge([e.entry_id for e in entries])
        versions += [e.segment.policy_version for e in entries]
    assert done.wait(5)
    thread.join()
    assert versions == [0, 1, 2, 3, 4] and producer.backpressure_s > 0.2
    assert redis_client.xlen(keys.stream) == 0 and payload_keys(redis_client, keys) == []


def test_append_survives_redis_losing_its_scripts(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref7")
    producer = SegmentProducer(redis_client, keys, max_len=10, inline_max_bytes=BIG)
    producer.append(make_segment(version=0))
    redis_client.script_flush()  # what a restarted Redis looks like to a client that loaded them before
    producer.append(make_segment(version=1))
    producer.append_many([make_segment(version=2)])
    assert redis_client.xlen(keys.stream) == 3


def test_acknowledging_more_ids_than_one_lua_slice(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref8")
    producer = SegmentProducer(redis_client, keys, max_len=5000)
    producer.append_many([make_segment(version=v % 3, length=1) for v in range(1200)])
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    entries = consumer.read(1200, block_ms=100)
    assert len(entries) == 1200
    consumer.acknowledge([e.entry_id for e in entries[:1100]], dropped=[e.entry_id for e in entries[1100:]])
    assert redis_client.xlen(keys.stream) == 0
    assert read_counter(redis_client, keys.consumed) == 1100 and read_counter(redis_client, keys.dropped) == 100


def test_a_duplicate_id_inside_a_batch_and_across_batches_is_stored_once(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref9")
    producer = SegmentProducer(redis_client, keys, max_len=10)  # inline payloads: one script call per batch
    a, b, c = (make_segment(version=v, segment_id=f"dup-{v}") for v in range(3))
    first = producer.append_many([a, b, a])  # the same segment twice in one call
    assert first[0] and first[1] and first[2] is None
    second = producer.append_many([c, b, a])  # across batches: only the new one goes in
    assert second[0] and second[1:] == [None, None]
    assert producer.append(b) is None and producer.append_many([c, c]) == [None, None]
    entries = SegmentConsumer(redis_client, keys, "learners", "rank-0").read(10, block_ms=100)
    assert [e.segment.segment_id for e in entries] == ["dup-0", "dup-1", "dup-2"]
    assert read_counter(redis_client, keys.produced) == 3


def test_inline_appends_survive_redis_losing_its_scripts(redis_client: redis.Redis) -> None:
    keys = StreamKeys("ref10")
    producer = SegmentProducer(redis_client, keys, max_len=100)
    producer.append_many([make_segment(version=v) for v in range(16)])
    redis_client.script_flush()
    ids = producer.append_many([make_segment(version=v) for v in range(16)])
    assert all(ids) and redis_client.xlen(keys.stream) == 32
    assert read_counter(redis_client, keys.produced) == 32
