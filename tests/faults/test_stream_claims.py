"""Entries left pending by a consumer that never comes back are claimed by another, and counted once."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from gsrl.stream import SegmentConsumer, SegmentProducer, StreamKeys, read_counter
from gsrl.trajectory import Segment

pytestmark = pytest.mark.integration


def make_segment(version: int = 0, length: int = 3) -> Segment:
    return Segment(
        observations={"state": torch.zeros(length, 4)},
        action_chunks=torch.zeros(length, 1, 2),
        logprobs=torch.zeros(length),
        values=torch.zeros(length),
        rewards=torch.zeros(length),
        terminated=torch.zeros(length, dtype=torch.bool),
        truncated=torch.zeros(length, dtype=torch.bool),
        next_values=torch.zeros(length),
        policy_versions=torch.full((length,), version, dtype=torch.int64),
        instructions=[""] * length,
        episodes=[],
        env_key="env-0/0",
    )


def test_pending_entries_of_a_dead_consumer_are_claimed_and_counted_once(redis_client: redis.Redis) -> None:
    keys = StreamKeys("claims")
    producer = SegmentProducer(redis_client, keys, max_len=100)
    for _ in range(4):
        producer.append(make_segment())
    gone = SegmentConsumer(redis_client, keys, "learners", "rank-7")  # a rank of a larger, earlier world
    taken = gone.read(4, block_ms=100)
    assert len(taken) == 4
    survivor = SegmentConsumer(redis_client, keys, "learners", "rank-0", claim_idle_ms=300)
    assert survivor.read(4, block_ms=50) == []  # not idle long enough yet
    time.sleep(0.4)
    survivor._next_claim = 0.0
    claimed = survivor.read(4, block_ms=50)
    assert sorted(e.entry_id for e in claimed) == sorted(e.entry_id for e in taken)
    survivor.acknowledge([e.entry_id for e in claimed])
    gone.acknowledge([e.entry_id for e in taken])  # it was only slow after all: no double count
    assert read_counter(redis_client, keys.consumed) == 4
    assert read_counter(redis_client, keys.produced) == 4 and redis_client.xlen(keys.stream) == 0


def test_a_retried_append_is_stored_once(redis_client: redis.Redis) -> None:
    keys = StreamKeys("dedupe")
    producer = SegmentProducer(redis_client, keys, max_len=100)
    segment = make_segment()
    segment.segment_id = "same-id"
    assert producer.append(segment) is not None
    assert producer.append(segment) is None  # the reply was lost and the producer tried again
    assert redis_client.xlen(keys.stream) == 1 and read_counter(redis_client, keys.produced) == 1
