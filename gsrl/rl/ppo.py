"""PPO losses as pure functions (CleanRL's ``ppo_continuous_action.py``, RLinf's metric names).

Everything is computed in float32 whatever the model dtype, because ratios of bf16 log-probs are
too coarse to clip at 1 +- 0.2 reliably (RLinf asserts fp32 log-probs for the same reason).
Inputs are flat ``[B]`` tensors, one entry per action chunk (chunk-level log-prob and value).
Returned metrics are detached 0-dim tensors so callers decide when to synchronize with the device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_ratio: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: mean of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(logp - logp_old).

    Metrics: ``approx_kl`` = mean((r - 1) - log r) (the non-negative, low-variance estimator of
    KL(old || new)), ``clipfrac`` = fraction of samples with |r - 1| > clip_ratio.
    """
    logratio = logprobs.float() - old_logprobs.float()
    ratio = logratio.exp()
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_ratio).float().mean()
    return loss, {"approx_kl": approx_kl, "clipfrac": clipfrac}


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, value_clip: float) -> tuple[Tensor, Tensor]:
    """Critic loss 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-value_clip).

    ``value_clip <= 0`` disables clipping (plain 0.5 * MSE). Also returns ``value_clip_ratio``: the
    fraction of samples where the clipped term is the larger one, i.e. where clipping cut the gradient.
    """
    values = values.float()
    returns = returns.float()
    unclipped = (values - returns).pow(2)
    if value_clip <= 0:
        return 0.5 * unclipped.mean(), torch.zeros((), device=values.device)
    old_values = old_values.float()
    values_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    clipped = (values_clipped - returns).pow(2)
    loss = 0.5 * torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        value_clip_ratio = (clipped > unclipped).float().mean()
    return loss, value_clip_ratio


def entropy_bonus(entropy: Tensor) -> Tensor:
    """Mean per-chunk entropy [B] -> scalar; the update subtracts ``entropy_coef`` times this."""
    return entropy.float().mean()


def normalize_advantages(advantages: Tensor, eps: float = 1e-5) -> Tensor:
    """(A - mean) / (std + eps) over all entries, float32 (RLinf's eps).

    Uses the population std so a single-sample batch gives zeros instead of NaN.
    """
    advantages = advantages.float()
    return (advantages - advantages.mean()) / (advantages.std(correction=0) + eps)


def explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 is no better than a constant; NaN if Var(R) = 0."""
    values = values.float()
    returns = returns.float()
    var_returns = returns.var(correction=0)
    if var_returns.item() == 0.0:
        return float("nan")
    return float(1.0 - (returns - values).var(correction=0) / var_returns)
