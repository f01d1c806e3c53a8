"""PPOLearnerCore: metric names and finiteness, and that PPO actually learns a one-step bandit."""

from __future__ import annotations

import math

import pytest
import torch
from _segments import one_step_segment

from gsrl.config import AlgoConfig
from gsrl.policy import build_policy
from gsrl.policy.base import Policy
from gsrl.trajectory import Segment
from services.learner.core import PPOLearnerCore, TorchEngine, build_rollout_batch

STATE_DIM, ACTION_DIM, CHUNK = 4, 2, 3
SPEC = {"state": ((STATE_DIM,), "float32")}
EXPECTED_METRICS = {
    "actor/loss",
    "actor/policy_loss",
    "actor/value_loss",
    "actor/grad_norm",
    "actor/approx_kl",
    "actor/pg_clipfrac",
    "actor/value_clip_ratio",
    "actor/entropy",
    "actor/explained_variance",
    "actor/num_samples",
    "rollout/returns_mean",
    "rollout/advantages_mean",
    "rollout/values_mean",
    "rollout/rewards_mean",
}


def _policy(seed: int = 0, **kwargs: object) -> Policy:
    torch.manual_seed(seed)
    return build_policy("gaussian_mlp", SPEC, ACTION_DIM, CHUNK, hidden_sizes=(64, 64), **kwargs)


def _bandit_segments(policy: Policy, num_segments: int, length: int, gen: torch.Generator) -> list[Segment]:
    """One-step episodes sampled from ``policy``: reward 1 iff the first action of the chunk has dim 0 > 0."""
    return [
        one_step_segment(policy, {"state": torch.randn(length, STATE_DIM, generator=gen)}) for _ in range(num_segments)
    ]


def _random_segments(policy: Policy, gen: torch.Generator) -> list[Segment]:
    """Multi-step segments with episode ends in the middle, as a policy server would send them."""
    segments = _bandit_segments(policy, num_segments=3, length=8, gen=gen)
    for seg in segments:
        seg.rewards = torch.randn(8, generator=gen)
        seg.terminated = torch.zeros(8, dtype=torch.bool)
        seg.terminated[3] = True
        seg.truncated = torch.zeros(8, dtype=torch.bool)
        seg.truncated[6] = True
        seg.next_values = torch.cat([seg.values[1:], torch.randn(1, generator=gen)])
        seg.next_values[3] = 0.0
    return segments


def test_build_rollout_batch_concatenates_segments() -> None:
    policy = _policy()
    segments = _random_segments(policy, torch.Generator().manual_seed(0))
    segments[0].instructions = ["put the cube on the plate"]
    batch = build_rollout_batch(segments, AlgoConfig())
    assert batch.size == 24
    assert batch.observations["state"].shape == (24, STATE_DIM)
    assert batch.action_chunks.shape == (24, CHUNK, ACTION_DIM)
    torch.testing.assert_close(batch.returns, batch.advantages + batch.old_values)
    assert batch.instructions is not None and len(batch.instructions) == 24
    assert batch.instructions[:8] == ["put the cube on the plate"] * 8 and batch.instructions[8] == ""


def test_update_returns_finite_metrics_with_rlinf_names() -> None:
    policy = _policy(obs_norm=True)
    engine = TorchEngine(policy.parameters(), lr=3e-4, max_grad_norm=1.0)
    core = PPOLearnerCore(policy, engine, AlgoConfig(entropy_coef=0.01), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = core.update(_random_segments(policy, torch.Generator().manual_seed(1)))
    assert set(metrics) >= EXPECTED_METRICS
    for name, value in metrics.items():
        assert math.isfinite(value), name
    assert metrics["actor/num_samples"] == 24
    assert metrics["actor/num_minibatch_steps"] == 16  # 4 epochs x 4 minibatches
    assert metrics["actor/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert policy.obs_norm.count.item() > 20  # normalizer saw the batch


def test_first_minibatch_of_fresh_data_has_ratio_one() -> None:
    # On-policy data and one minibatch step: KL and clip fraction are measured before the step, so 0.
    policy = _policy()
    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=3e-4, max_grad_norm=1.0),
        AlgoConfig(update_epochs=1, num_minibatches=1),
    )
    metrics = core.update(_random_segments(policy, torch.Generator().manual_seed(2)))
    assert metrics["actor/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0


def test_target_kl_stops_early() -> None:
    policy = _policy()
    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=0.05, max_grad_norm=0.0),
        AlgoConfig(update_epochs=10, target_kl=1e-6),
        generator=torch.Generator().manual_seed(0),
    )
    metrics = core.update(_random_segments(policy, torch.Generator().manual_seed(3)))
    assert metrics["actor/early_stopped"] == 1.0
    assert metrics["actor/num_minibatch_steps"] < 40


def _one_update(algo: AlgoConfig) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One update of a fresh policy (same init, same data, same shuffles) with ``algo``; its metrics and weights."""
    policy = _policy()
    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=algo.lr, max_grad_norm=0.0),
        algo,
        generator=torch.Generator().manual_seed(0),
    )
    metrics = core.update(_random_segments(policy, torch.Generator().manual_seed(3)))
    return metrics, [p.detach().clone() for p in policy.parameters()]


@pytest.mark.parametrize("micro_batch_size", [0, 5])
def test_the_step_that_would_pass_target_kl_is_not_taken(micro_batch_size: int) -> None:
    """After one large step every minibatch shows a KL far above the limit: the update ends with exactly that step
    (the first always goes), not with a second one on top, whether the minibatch runs in one pass or in micro-batches
    (whose KL is measured before their backward passes)."""
    stopped, weights = _one_update(
        AlgoConfig(update_epochs=10, num_minibatches=1, lr=0.05, target_kl=1e-6, micro_batch_size=micro_batch_size)
    )
    assert stopped["actor/early_stopped"] == 1.0 and stopped["actor/num_minibatch_steps"] == 1
    assert stopped["actor/stopping_approx_kl"] > 1e-6 and stopped["actor/approx_kl"] < 1e-6  # the one step's: on-policy
    _, one_step = _one_update(AlgoConfig(update_epochs=1, num_minibatches=1, lr=0.05))
    for got, want in zip(weights, one_step, strict=True):
        torch.testing.assert_close(got, want)
    # Without a limit the same update takes all 10 steps.
    free, _ = _one_update(AlgoConfig(update_epochs=10, num_minibatches=1, lr=0.05, micro_batch_size=micro_batch_size))
    assert free["actor/num_minibatch_steps"] == 10 and free["actor/early_stopped"] == 0.0
    assert "actor/stopping_approx_kl" not in free


def test_the_first_step_goes_even_on_stale_rollouts() -> None:
    """Rollouts from an older policy (here: the behaviour log-probs shifted) have a KL above the limit before any
    step; the update still takes its first step, so training cannot stall on a lagging stream."""
    policy = _policy()
    segments = _random_segments(policy, torch.Generator().manual_seed(3))
    for seg in segments:
        seg.logprobs = seg.logprobs - 1.0  # every ratio e: approx KL about 0.72 from the first forward pass
    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=1e-3, max_grad_norm=1.0),
        AlgoConfig(update_epochs=4, num_minibatches=2, target_kl=0.1),
        generator=torch.Generator().manual_seed(0),
    )
    metrics = core.update(segments)
    assert metrics["actor/num_minibatch_steps"] == 1 and metrics["actor/early_stopped"] == 1.0
    assert metrics["actor/approx_kl"] > 0.1


def test_target_kl_decides_on_the_kl_averaged_over_ranks() -> None:
    """A data-parallel rank stops when the ranks' mean KL passes target_kl, even if its own KL never does: every rank
    must take the same number of optimizer steps, or their gradient all-reduces stop pairing up."""
    reported: list[float] = []

    def with_a_rank_far_off(tensor: torch.Tensor) -> torch.Tensor:
        # The one cross-rank sum the update makes here is [kl, 1]; the other rank adds a KL of 1000.
        reported.append(float(tensor[0]))
        return tensor + torch.tensor([1000.0, 1.0], dtype=tensor.dtype)

    runs = {}
    for name, all_reduce_sum in (("alone", None), ("two ranks", with_a_rank_far_off)):
        policy = _policy()
        core = PPOLearnerCore(
            policy,
            TorchEngine(policy.parameters(), lr=1e-3, max_grad_norm=1.0),
            AlgoConfig(update_epochs=4, num_minibatches=2, target_kl=1.0),
            generator=torch.Generator().manual_seed(0),
            all_reduce_sum=all_reduce_sum,
        )
        runs[name] = core.update(_random_segments(policy, torch.Generator().manual_seed(3)))
    assert runs["alone"]["actor/early_stopped"] == 0.0 and runs["alone"]["actor/num_minibatch_steps"] == 8
    assert runs["two ranks"]["actor/early_stopped"] == 1.0 and runs["two ranks"]["actor/num_minibatch_steps"] == 1
    assert len(reported) == 1 and reported[0] < 1.0  # this rank's own KL alone would not have stopped it


def test_too_few_samples_for_minibatches_is_an_error() -> None:
    policy = _policy()
    core = PPOLearnerCore(policy, TorchEngine(policy.parameters(), lr=3e-4, max_grad_norm=1.0), AlgoConfig())
    with pytest.raises(ValueError, match="minibatches"):
        core.update(_bandit_segments(policy, num_segments=1, length=3, gen=torch.Generator().manual_seed(0)))


def test_ppo_learns_one_step_bandit() -> None:
    policy = _policy(seed=1)
    algo = AlgoConfig(lr=3e-3)
    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=algo.lr, max_grad_norm=algo.max_grad_norm),
        algo,
        generator=torch.Generator().manual_seed(0),
    )
    gen = torch.Generator().manual_seed(0)
    probe = {"state": torch.randn(512, STATE_DIM, generator=gen)}

    def mean_first_action() -> float:
        return float(policy.act(probe, deterministic=True).action_chunk[:, 0, 0].mean())

    start = mean_first_action()
    rewards = []
    for _ in range(15):
        metrics = core.update(_bandit_segments(policy, num_segments=8, length=32, gen=gen))
        rewards.append(metrics["rollout/rewards_mean"])
    assert mean_first_action() > start + 0.3
    assert sum(rewards[-3:]) / 3 > 0.75  # started near 0.5 (a coin flip)


@pytest.mark.parametrize("micro_batch_size", [5, 12, 24, 100])
def test_micro_batches_give_the_whole_minibatchs_update(micro_batch_size: int) -> None:
    """Accumulating share-weighted micro-batch losses (24 samples; 5 leaves a remainder of 4) must move the weights
    exactly as one pass over the minibatch does, and report the same metrics."""
    results = []
    for micro in (0, micro_batch_size):
        policy = _policy(obs_norm=True)
        engine = TorchEngine(policy.parameters(), lr=1e-2, max_grad_norm=1.0)
        algo = AlgoConfig(update_epochs=2, num_minibatches=1, micro_batch_size=micro, entropy_coef=0.01)
        core = PPOLearnerCore(policy, engine, algo, generator=torch.Generator().manual_seed(0))
        metrics = core.update(_random_segments(policy, torch.Generator().manual_seed(4)))
        results.append(([p.detach().clone() for p in policy.parameters()], metrics))
    (whole, whole_metrics), (micro, micro_metrics) = results
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ("actor/loss", "actor/approx_kl", "actor/value_loss", "actor/entropy", "actor/grad_norm"):
        assert micro_metrics[name] == pytest.approx(whole_metrics[name], rel=1e-4, abs=1e-6), name


def _actor_critic_engine(policy: Policy, lr: float = 1e-2, critic_lr: float = 1e-2) -> TorchEngine:
    """The learner's "actor" and "critic" param groups (``param_groups``, as DeepSpeedEngine builds them)."""
    from services.learner.engine import param_groups  # imports deepspeed: only where a test needs it

    return TorchEngine(param_groups(policy, AlgoConfig(lr=lr, critic_lr=critic_lr)), lr=lr, max_grad_norm=1.0)


def test_a_critic_warmup_update_fits_the_critic_and_leaves_the_actor_exactly_as_it_was() -> None:
    policy = _policy()
    engine = _actor_critic_engine(policy)
    core = PPOLearnerCore(policy, engine, AlgoConfig(), generator=torch.Generator().manual_seed(0))
    segments = _random_segments(policy, torch.Generator().manual_seed(4))
    critic = {id(p) for p in policy.critic_parameters()}
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    warm = core.update(segments, critic_only=True)
    assert warm["actor/critic_only"] == 1.0
    assert warm["actor/approx_kl"] == pytest.approx(0.0, abs=1e-6), "the policy never moved: ratio 1 throughout"
    moved = {name for name, p in policy.named_parameters() if not torch.equal(before[name], p)}
    critic_names = {name for name, p in policy.named_parameters() if id(p) in critic}
    assert moved and moved <= critic_names, f"only the critic may move, moved: {sorted(moved - critic_names)}"
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-2, 1e-2], "the actor's lr is restored"
    value_loss_after = core.update(segments, critic_only=True)["actor/value_loss"]
    assert value_loss_after < warm["actor/value_loss"], "the critic fits the returns"
    normal = core.update(segments)
    assert normal["actor/critic_only"] == 0.0
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters() if n not in critic_names)


def test_a_critic_warmup_without_an_actor_group_is_refused() -> None:
    policy = _policy()
    core = PPOLearnerCore(policy, TorchEngine(policy.parameters(), lr=1e-3, max_grad_norm=1.0), AlgoConfig())
    with pytest.raises(ValueError, match="algo.critic_lr"):
        core.update(_random_segments(policy, torch.Generator().manual_seed(5)), critic_only=True)
