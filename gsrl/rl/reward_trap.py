"""Whether a shaped reward pays a policy more for never finishing than for succeeding.

A task that ends its episode at success and pays shaping on every other step invites a trap: the value of staying
one step short of success forever (the shaping ceiling every decision, discounted; truncated episodes are bootstrapped,
so the time limit does not bound it) can exceed the one success reward. PPO then learns to hover, and the return rises
while the success rate falls. PutCubeOnPlate keeps its shaping at a tenth of success for this reason, which is safe
for per-step PPO at gamma 0.8 but not for chunk-level PPO: a decision there sums ``action_chunk`` steps of shaping,
and the recipe's gamma is 0.99 per decision. The seventh session's GPU run hit exactly this (docs/benchmarks.md).
"""

from __future__ import annotations

from gsrl.config import Config


def hover_to_success_ratio(shaping_ceiling: float, gamma: float, action_chunk: int) -> float:
    """Value of collecting the shaping ceiling on every decision forever, in units of the success reward.

    ``shaping_ceiling`` is a non-success step's largest reward as a fraction of the success step's; each decision
    collects ``action_chunk`` such steps. Infinite for gamma = 1.
    """
    per_decision = shaping_ceiling * action_chunk
    return float("inf") if gamma >= 1 else per_decision / (1.0 - gamma)


def reward_trap_warning(
    shaping_ceiling: float | None, gamma: float, action_chunk: int, reward_mode: str, relative: bool = False
) -> str | None:
    """A warning naming the settings when hovering is worth at least one success (None when it is not, or when the
    task has no shaping ceiling to check: sparse rewards, or a task that does not declare one). A relative reward
    (``task.relative_reward``) pays a state's shaping once, on reaching it, so hovering earns nothing: no trap."""
    if relative or shaping_ceiling is None or shaping_ceiling <= 0:
        return None
    ratio = hover_to_success_ratio(shaping_ceiling, gamma, action_chunk)
    if ratio < 1.0:
        return None
    return (
        f"task.reward_mode={reward_mode} with algo.gamma={gamma} and policy.action_chunk={action_chunk}: never "
        f"succeeding is worth up to {ratio:.3g}x a success (shaping up to {shaping_ceiling:g} of the success reward "
        "per step, success ends the episode), so PPO can learn to stop short of success. Use task.reward_mode=sparse "
        "(the pi_RL recipe's success-only reward), task.relative_reward=true (the shaping paid once, as a change), "
        "or a gamma with (1 - gamma) > shaping x action_chunk."
    )


def config_reward_trap_warning(config: Config, shaping_ceiling: float | None) -> str | None:
    """``reward_trap_warning`` for a run's config and its task's shaping ceiling (``EnvSpec.shaping_ceiling``)."""
    return reward_trap_warning(
        shaping_ceiling,
        config.algo.gamma,
        config.policy.action_chunk,
        config.task.reward_mode,
        config.task.relative_reward,
    )
