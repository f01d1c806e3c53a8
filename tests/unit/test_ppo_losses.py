"""PPO losses against hand-computed numbers."""

from __future__ import annotations

import math

import torch

from gsrl.rl import clipped_value_loss, explained_variance, normalize_advantages, ppo_policy_loss


def _logprobs_for_ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.tensor([-1.0] * len(ratios))
    return old + torch.log(torch.tensor(ratios)), old


def test_policy_loss_inside_and_outside_clip_range() -> None:
    # clip_ratio 0.2 -> clip(r) in [0.8, 1.2]; per-sample loss = max(-A*r, -A*clip(r))
    # r=1.1, A=+1: max(-1.1, -1.1) = -1.1        (inside the range)
    # r=1.5, A=+1: max(-1.5, -1.2) = -1.2        (clipped: no incentive to push r further up)
    # r=0.5, A=+1: max(-0.5, -0.8) = -0.5        (unclipped: a bad move is always penalized)
    # r=0.5, A=-2: max(1.0, 1.6)   = 1.6         (clipped)
    # r=1.5, A=-2: max(3.0, 2.4)   = 3.0         (unclipped pessimistic term)
    # r=0.9, A=-2: max(1.8, 1.8)   = 1.8         (inside)
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]
    advantages = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0])
    logprobs, old = _logprobs_for_ratios(ratios)
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, clip_ratio=0.2)
    expected = (-1.1 - 1.2 - 0.5 + 1.6 + 3.0 + 1.8) / 6
    torch.testing.assert_close(loss, torch.tensor(expected))
    # |r - 1| > 0.2 for 1.5, 0.5, 0.5, 1.5 -> 4 of 6
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(4 / 6))
    # approx_kl = mean((r - 1) - log r)
    expected_kl = sum((r - 1) - math.log(r) for r in ratios) / len(ratios)
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl))


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    logprobs, old = _logprobs_for_ratios([1.5, 1.1])
    logprobs.requires_grad_(True)
    loss, _ = ppo_policy_loss(logprobs, old, torch.tensor([1.0, 1.0]), clip_ratio=0.2)
    loss.backward()
    # d/dlogp of -A*r/2 = -A*r/2 for the unclipped sample; clipped sample contributes nothing.
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, -1.1 / 2]))


def test_equal_logprobs_give_zero_kl_and_clipfrac() -> None:
    logprobs = torch.tensor([-3.0, -0.5, -7.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    loss, metrics = ppo_policy_loss(logprobs, logprobs.clone(), advantages, clip_ratio=0.2)
    torch.testing.assert_close(loss, -advantages.mean())  # r = 1 everywhere
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["clipfrac"].item() == 0.0


def test_policy_loss_is_float32_for_bf16_inputs() -> None:
    logprobs = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    loss, metrics = ppo_policy_loss(logprobs, logprobs, torch.tensor([1.0, 1.0], dtype=torch.bfloat16), 0.2)
    assert loss.dtype == torch.float32
    assert metrics["approx_kl"].dtype == torch.float32


def test_clipped_value_loss() -> None:
    old_values = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([1.0, 0.1, -1.0])
    returns = torch.tensor([0.0, 1.0, -2.0])
    # value_clip 0.2 -> V_clip = [0.2, 0.1, -0.2]
    # sample 0: unclipped (1-0)^2 = 1,     clipped (0.2-0)^2 = 0.04  -> 1      (unclipped larger)
    # sample 1: unclipped (0.1-1)^2 = 0.81, clipped same 0.81        -> 0.81   (inside: not clipped)
    # sample 2: unclipped (-1+2)^2 = 1,    clipped (-0.2+2)^2 = 3.24 -> 3.24   (clipped larger)
    # loss = 0.5 * (1 + 0.81 + 3.24) / 3 ; value_clip_ratio = 1/3
    loss, clip_ratio = clipped_value_loss(values, old_values, returns, value_clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1 + 0.81 + 3.24) / 3))
    torch.testing.assert_close(clip_ratio, torch.tensor(1 / 3))


def test_value_clip_disabled_is_half_mse() -> None:
    old_values = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([1.0, 0.1, -1.0])
    returns = torch.tensor([0.0, 1.0, -2.0])
    for value_clip in (0.0, -1.0):
        loss, clip_ratio = clipped_value_loss(values, old_values, returns, value_clip=value_clip)
        torch.testing.assert_close(loss, torch.tensor(0.5 * (1 + 0.81 + 1) / 3))
        assert clip_ratio.item() == 0.0


def test_normalize_advantages() -> None:
    advantages = torch.tensor([1.0, 2.0, 3.0, 4.0])
    normalized = normalize_advantages(advantages)
    assert abs(normalized.mean().item()) < 1e-6
    assert abs(normalized.std(correction=0).item() - 1.0) < 1e-4
    assert torch.isfinite(normalize_advantages(torch.tensor([5.0]))).all()


def test_explained_variance() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0])
    assert explained_variance(returns, returns) == 1.0
    assert abs(explained_variance(torch.full((3,), 2.0), returns)) < 1e-6
    assert math.isnan(explained_variance(returns, torch.ones(3)))
