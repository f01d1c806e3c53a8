"""Synthetic PPO data for learner tests: segments of one-step episodes that a policy has just acted in.

Shared by the in-process learner tests and the DeepSpeed workers (which import it from a subprocess, with tests/ on
their PYTHONPATH).
"""

from __future__ import annotations

import torch

from gsrl.policy import Policy
from gsrl.trajectory import Segment


def one_step_segment(
    policy: Policy, observations: dict[str, torch.Tensor], rewards: torch.Tensor | None = None
) -> Segment:
    """``policy``'s sampled chunks for ``observations``, each a whole (terminated) episode paid ``rewards``; by
    default a bandit PPO can learn: reward 1 iff the chunk's first action has dim 0 > 0."""
    out = policy.act(observations)
    if rewards is None:
        rewards = (out.action_chunk[:, 0, 0] > 0).float()
    size = len(rewards)
    return Segment(
        observations=observations,
        action_chunks=out.action_chunk,
        logprobs=out.logprobs,
        values=out.values,
        rewards=rewards,
        terminated=torch.ones(size, dtype=torch.bool),
        truncated=torch.zeros(size, dtype=torch.bool),
        next_values=torch.zeros(size),
        policy_versions=torch.zeros(size, dtype=torch.int64),
    )
