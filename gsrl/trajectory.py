"""Trajectory segments: the unit of data that flows from policy servers to learners.

A segment holds T consecutive chunk-level transitions of one environment. It is plain tensors
here; ``gsrl.stream`` turns it into a ``gsrl.v1.TrajectorySegment`` protobuf for Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EpisodeSummary:
    """One finished episode, reported by the env server when it ended."""

    episode_return: float
    episode_length: int
    success_once: bool


@dataclass
class Segment:
    """T transitions of one env. Shapes: T = time, C = action chunk length, A = action dim.

    ``next_values[t]`` is V(s_{t+1}) used for bootstrapping: the next transition's value, the
    value of the pre-reset observation where the episode was truncated, 0 where it terminated,
    and the bootstrap value at t = T-1. Keeping it explicit lets GAE treat ``terminated`` and
    ``truncated`` correctly without the learner ever seeing the final observations.
    """

    observations: dict[str, torch.Tensor]  # each [T, ...]
    action_chunks: torch.Tensor  # [T, C, A] float32, normalized action space
    logprobs: torch.Tensor  # [T] float32, log-prob of the whole chunk under the behaviour policy
    values: torch.Tensor  # [T] float32
    rewards: torch.Tensor  # [T] float32
    terminated: torch.Tensor  # [T] bool
    truncated: torch.Tensor  # [T] bool
    next_values: torch.Tensor  # [T] float32
    policy_versions: torch.Tensor  # [T] int64
    instructions: list[str] = field(default_factory=list)
    episodes: list[EpisodeSummary] = field(default_factory=list)
    # name -> [T, ...]: the policy's ``PolicyOutput.extras`` per step (a flow policy's denoising chain).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    segment_id: str = ""
    env_key: str = ""
    created_unix: float = 0.0

    @property
    def length(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def policy_version(self) -> int:
        """Oldest policy version among the transitions: the learner measures lag from it."""
        return int(self.policy_versions.min().item()) if self.length else 0
