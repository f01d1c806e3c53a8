"""Generalized advantage estimation over chunk-level steps (one action chunk = one MDP step).

gamma and lambda apply once per chunk, as in RLinf's chunk_level rewards. The caller supplies
``next_values`` explicitly (see ``gsrl.trajectory.Segment``), so this function never needs the
observation after a reset: termination drops the bootstrap, truncation keeps it, and both cut the
recursion so advantages never leak across an episode boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Return ``(advantages, returns)``, float32, shaped like ``rewards``.

    All inputs are ``[T]`` or ``[N, T]`` (time is the last dim).

    - delta_t = r_t + gamma * next_values_t * (1 - terminated_t) - values_t
    - A_t = delta_t + gamma * lambda * (1 - (terminated_t | truncated_t)) * A_{t+1}, with A_T = 0
    - returns_t = A_t + values_t (the critic's regression target)
    """
    rewards = rewards.float()
    values = values.float()
    next_values = next_values.float()
    terminated = terminated.bool()
    not_terminated = (~terminated).float()
    # Any episode end stops the recursion; only termination also drops the bootstrap value.
    not_done = (~(terminated | truncated.bool())).float()

    deltas = rewards + gamma * next_values * not_terminated - values
    advantages = torch.zeros_like(deltas)
    last_advantage = torch.zeros_like(deltas[..., 0])
    for t in reversed(range(deltas.shape[-1])):
        last_advantage = deltas[..., t] + gamma * gae_lambda * not_done[..., t] * last_advantage
        advantages[..., t] = last_advantage
    return advantages, advantages + values
