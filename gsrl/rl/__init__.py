"""PPO math as pure functions: GAE advantages and the clipped losses (CleanRL style, RLinf's names)."""

from gsrl.rl.gae import compute_gae
from gsrl.rl.ppo import clipped_value_loss, entropy_bonus, explained_variance, normalize_advantages, ppo_policy_loss

__all__ = [
    "clipped_value_loss",
    "compute_gae",
    "entropy_bonus",
    "explained_variance",
    "normalize_advantages",
    "ppo_policy_loss",
]
