"""GAE against hand-computed numbers. gamma = lambda = 0.5 so gamma * lambda = 0.25 and the arithmetic is exact."""

from __future__ import annotations

import torch

from gsrl.rl import compute_gae

GAMMA = 0.5
LAMBDA = 0.5


def _flags(*indices: int, length: int) -> torch.Tensor:
    flags = torch.zeros(length, dtype=torch.bool)
    flags[list(indices)] = True
    return flags


def test_no_episode_end_bootstraps_from_last_next_value() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([1.0, 1.0, 1.0])
    next_values = torch.tensor([1.0, 1.0, 2.0])  # V(s_1), V(s_2), bootstrap V(s_3) = 2
    # delta_0 = 1 + 0.5*1 - 1 = 0.5 ; delta_1 = 2 + 0.5*1 - 1 = 1.5 ; delta_2 = 3 + 0.5*2 - 1 = 3.0
    # A_2 = 3.0 ; A_1 = 1.5 + 0.25*3.0 = 2.25 ; A_0 = 0.5 + 0.25*2.25 = 1.0625 ; returns = A + 1
    no_end = torch.zeros(3, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, next_values, no_end, no_end, GAMMA, LAMBDA)
    torch.testing.assert_close(advantages, torch.tensor([1.0625, 2.25, 3.0]))
    torch.testing.assert_close(returns, torch.tensor([2.0625, 3.25, 4.0]))


def test_termination_drops_bootstrap_and_cuts_recursion() -> None:
    rewards = torch.ones(4)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # next_values[1] would be 0 in a real Segment; 99 proves termination ignores it.
    next_values = torch.tensor([2.0, 99.0, 4.0, 5.0])
    # delta_0 = 1 + 0.5*2 - 1 = 1 ; delta_1 = 1 + 0 - 2 = -1 (no bootstrap)
    # delta_2 = 1 + 0.5*4 - 3 = 0 ; delta_3 = 1 + 0.5*5 - 4 = -0.5
    # A_3 = -0.5 ; A_2 = 0 + 0.25*(-0.5) = -0.125 ; A_1 = -1 (episode ended: nothing from A_2)
    # A_0 = 1 + 0.25*(-1) = 0.75 ; returns = A + V = [1.75, 1, 2.875, 3.5]
    advantages, returns = compute_gae(
        rewards, values, next_values, _flags(1, length=4), _flags(length=4), GAMMA, LAMBDA
    )
    torch.testing.assert_close(advantages, torch.tensor([0.75, -1.0, -0.125, -0.5]))
    torch.testing.assert_close(returns, torch.tensor([1.75, 1.0, 2.875, 3.5]))


def test_truncation_bootstraps_from_next_value_and_cuts_recursion() -> None:
    rewards = torch.ones(4)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    next_values = torch.tensor([2.0, 6.0, 4.0, 5.0])  # 6 = V(pre-reset observation) at the truncation
    # delta_1 = 1 + 0.5*6 - 2 = 2 ; the other deltas as in the termination test: 1, 0, -0.5
    # A_3 = -0.5 ; A_2 = -0.125 ; A_1 = 2 (cut) ; A_0 = 1 + 0.25*2 = 1.5 ; returns = [2.5, 4, 2.875, 3.5]
    advantages, returns = compute_gae(
        rewards, values, next_values, _flags(length=4), _flags(1, length=4), GAMMA, LAMBDA
    )
    torch.testing.assert_close(advantages, torch.tensor([1.5, 2.0, -0.125, -0.5]))
    torch.testing.assert_close(returns, torch.tensor([2.5, 4.0, 2.875, 3.5]))


def test_batched_equals_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    n, t = 5, 7
    rewards, values, next_values = (torch.randn(n, t, generator=gen) for _ in range(3))
    terminated = torch.rand(n, t, generator=gen) < 0.2
    truncated = (torch.rand(n, t, generator=gen) < 0.2) & ~terminated
    advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, 0.99, 0.95)
    assert advantages.shape == returns.shape == (n, t)
    for i in range(n):
        row_adv, row_ret = compute_gae(rewards[i], values[i], next_values[i], terminated[i], truncated[i], 0.99, 0.95)
        torch.testing.assert_close(advantages[i], row_adv)
        torch.testing.assert_close(returns[i], row_ret)


def test_lambda_one_no_ends_is_discounted_return_minus_value() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 0.25, 1.0])
    next_values = torch.tensor([0.25, 1.0, 4.0])
    no_end = torch.zeros(3, dtype=torch.bool)
    # Monte Carlo with bootstrap: G_0 = 1 + 0.5*0 + 0.25*2 + 0.125*4 = 2.0 ; A_0 = G_0 - V_0 = 1.5
    advantages, _ = compute_gae(rewards, values, next_values, no_end, no_end, GAMMA, 1.0)
    torch.testing.assert_close(advantages[0], torch.tensor(1.5))
