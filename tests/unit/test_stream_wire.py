"""``segment_to_bytes`` writes the tensor fields by hand: it must parse exactly as the message upb builds."""

from __future__ import annotations

import torch

from gsrl import codec
from gsrl.stream import _STEP_FIELDS, segment_from_proto, segment_to_bytes, segment_to_proto
from gsrl.trajectory import EpisodeSummary, Segment
from gsrl.v1 import trajectory_pb2


def make_segment(length: int = 4) -> Segment:
    return Segment(
        observations={
            "state": torch.randn(length, 5),
            "rgb": torch.randint(0, 255, (length, 3, 64, 64), dtype=torch.uint8),  # past the view threshold
        },
        action_chunks=torch.randn(length, 2, 7),
        logprobs=torch.randn(length),
        values=torch.randn(length),
        rewards=torch.randn(length),
        terminated=torch.tensor([False] * (length - 1) + [True]),
        truncated=torch.zeros(length, dtype=torch.bool),
        next_values=torch.randn(length),
        policy_versions=torch.tensor([5, 3, 4, 5][:length]),
        instructions=["pick up the cube"] * length,
        episodes=[EpisodeSummary(1.5, 30, True), EpisodeSummary(-0.25, 2, False)],
        extras={"chain": torch.randn(length, 3, 2, 7).to(torch.bfloat16), "noise": torch.randn(2, length).t()},
        segment_id="seg-1",
        env_key="env-0/1",
        created_unix=1234.5,
    )


def reference(segment: Segment) -> trajectory_pb2.TrajectorySegment:
    """The message as upb builds it from ``codec.encode`` (what the producer stored before)."""
    return trajectory_pb2.TrajectorySegment(
        segment_id=segment.segment_id,
        env_key=segment.env_key,
        policy_version=segment.policy_version,
        instructions=segment.instructions,
        created_unix=segment.created_unix,
        observations=codec.encode_map(segment.observations),
        extras=codec.encode_map(segment.extras),
        episodes=[
            trajectory_pb2.EpisodeSummary(
                episode_return=e.episode_return, episode_length=e.episode_length, success_once=e.success_once
            )
            for e in segment.episodes
        ],
        **{name: codec.encode(getattr(segment, name)) for name in _STEP_FIELDS},
    )


def test_segment_bytes_parse_as_the_message_protobuf_builds() -> None:
    segment = make_segment()
    payload = segment_to_bytes(segment)
    expected = reference(segment)
    assert trajectory_pb2.TrajectorySegment.FromString(payload) == expected
    assert len(payload) == len(expected.SerializeToString())
    assert segment_to_proto(segment) == expected and expected.policy_version == 3


def test_segment_bytes_round_trip_through_the_decoder() -> None:
    segment = make_segment()
    got = segment_from_proto(trajectory_pb2.TrajectorySegment.FromString(segment_to_bytes(segment)))
    for name in _STEP_FIELDS:
        assert torch.equal(getattr(got, name), getattr(segment, name)), name
    for group in ("observations", "extras"):
        mine, theirs = getattr(got, group), getattr(segment, group)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), group
    assert (got.segment_id, got.env_key, got.created_unix) == ("seg-1", "env-0/1", 1234.5)
    assert got.episodes == segment.episodes and got.instructions == segment.instructions


def test_explicit_id_and_version_and_a_fresh_id_when_there_is_none() -> None:
    segment = make_segment()
    message = trajectory_pb2.TrajectorySegment.FromString(segment_to_bytes(segment, "other", policy_version=9))
    assert (message.segment_id, message.policy_version) == ("other", 9)
    segment.segment_id = ""
    first, second = (trajectory_pb2.TrajectorySegment.FromString(segment_to_bytes(segment)) for _ in range(2))
    assert first.segment_id and first.segment_id != second.segment_id


def test_empty_maps_and_lists() -> None:
    segment = make_segment(length=1)
    segment.observations, segment.extras, segment.episodes, segment.instructions = {}, {}, [], []
    assert trajectory_pb2.TrajectorySegment.FromString(segment_to_bytes(segment)) == reference(segment)
