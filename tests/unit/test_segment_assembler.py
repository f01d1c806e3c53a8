"""Segment assembly on the policy server: transitions, bootstrap values, episode ends, flushing."""

from __future__ import annotations

import pytest
import torch

from gsrl.trajectory import EpisodeSummary
from services.policy_server.core import (
    InferenceResult,
    InvalidObservation,
    SegmentAssembler,
    StepOutcome,
    validate_observations,
)

B, C, A = 2, 1, 3


def outcome(step: int, values: list[float], rewards=None, terminated=None, truncated=None, final=None, version=0):
    """Observation of env i at this step is [step, i]; actions are filled with the step number."""
    obs = {"state": torch.tensor([[float(step), float(i)] for i in range(B)])}
    extra = torch.tensor(final, dtype=torch.float32) if final else None
    rows = None
    if truncated is not None:
        rows = torch.full((B,), -1, dtype=torch.long)
        idx = [i for i, t in enumerate(truncated) if t and not (terminated and terminated[i])]
        rows[idx] = torch.arange(len(idx))
    result = InferenceResult(
        action_chunk=torch.full((B, C, A), float(step)),
        logprobs=torch.full((B,), -float(step)),
        values=torch.tensor(values, dtype=torch.float32),
        extra_values=extra,
        policy_version=version,
    )

    def as_t(values, dtype):
        return None if values is None else torch.tensor(values, dtype=dtype)

    return StepOutcome(
        observations=obs,
        instructions=["put"] * B,
        result=result,
        rewards=as_t(rewards, torch.float32),
        terminated=as_t(terminated, torch.bool),
        truncated=as_t(truncated, torch.bool),
        final_value_rows=rows,
    )


def test_segments_carry_next_values_and_cut_at_length() -> None:
    asm = SegmentAssembler("env-a", B, segment_length=2)
    assert asm.record(outcome(0, [0.5, 0.6])) == []
    assert asm.record(outcome(1, [1.5, 1.6], rewards=[1, 2], terminated=[False] * 2, truncated=[False] * 2)) == []
    segments = asm.record(
        outcome(2, [2.5, 2.6], rewards=[3, 4], terminated=[False] * 2, truncated=[False] * 2, version=1)
    )
    assert [s.env_key for s in segments] == ["env-a/0", "env-a/1"]
    seg = segments[1]
    assert seg.length == 2
    torch.testing.assert_close(seg.observations["state"], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(seg.values, torch.tensor([0.6, 1.6]))
    torch.testing.assert_close(seg.rewards, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(seg.next_values, torch.tensor([1.6, 2.6]))  # the last one is the bootstrap
    torch.testing.assert_close(seg.logprobs, torch.tensor([0.0, -1.0]))
    assert seg.action_chunks.shape == (2, C, A)
    assert seg.policy_versions.tolist() == [0, 0]  # actions at steps 0 and 1 came from version 0


def test_termination_zeroes_and_truncation_bootstraps_from_final_observation() -> None:
    asm = SegmentAssembler("env-b", B, segment_length=1)
    asm.record(outcome(0, [0.5, 0.6]))
    out = outcome(1, [9.0, 9.0], rewards=[1, 1], terminated=[True, False], truncated=[False, True], final=[7.0])
    out.episodes = {0: EpisodeSummary(3.0, 10, True), 1: EpisodeSummary(1.0, 50, False)}
    env0, env1 = asm.record(out)
    assert env0.terminated.tolist() == [True] and env0.truncated.tolist() == [False]
    assert env0.next_values.tolist() == [0.0]
    assert env1.truncated.tolist() == [True] and env1.next_values.tolist() == [7.0]
    assert env0.episodes == [EpisodeSummary(3.0, 10, True)]


def test_truncation_without_final_value_is_an_error() -> None:
    asm = SegmentAssembler("env-c", B, segment_length=4)
    asm.record(outcome(0, [0.0, 0.0]))
    bad = outcome(1, [0.0, 0.0], rewards=[0, 0], terminated=[False, False], truncated=[True, False])
    bad.result.extra_values = None
    with pytest.raises(ValueError, match="truncated"):
        asm.record(bad)


def test_flush_keeps_completed_transitions_only() -> None:
    asm = SegmentAssembler("env-d", B, segment_length=8)
    asm.record(outcome(0, [0.0, 0.0]))
    asm.record(outcome(1, [0.0, 0.0], rewards=[1, 1], terminated=[False] * 2, truncated=[False] * 2))
    assert asm.buffered_transitions == 2
    flushed = asm.flush()
    assert [s.length for s in flushed] == [1, 1]  # the pending step-1 actions had no outcome yet
    assert all(s.truncated.tolist() == [True] for s in flushed)  # cut short: bootstrap from next_value
    assert asm.flush() == []


def test_validate_observations_messages() -> None:
    spec = {"state": ((2,), "float32")}
    assert validate_observations({"state": torch.zeros(3, 2)}, spec) == 3
    cases = [
        ({"state": torch.zeros(3, 4)}, "shape"),
        ({"state": torch.zeros(3, 2, dtype=torch.float64)}, "dtype"),
        ({"rgb": torch.zeros(3, 2)}, "keys"),
        ({"state": torch.tensor([[0.0, float("nan")]])}, "NaN"),
        ({"state": torch.zeros(0, 2)}, "empty"),
    ]
    for obs, fragment in cases:
        with pytest.raises(InvalidObservation, match=fragment):
            validate_observations(obs, spec)
    with pytest.raises(InvalidObservation, match="rows"):
        validate_observations({"state": torch.zeros(3, 2)}, spec, batch_size=4)
