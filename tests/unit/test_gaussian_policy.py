"""GaussianMLPPolicy: shapes, act/evaluate agreement, determinism, state_dict round trip, obs normalizer."""

from __future__ import annotations

import torch

from gsrl.policy import Policy, build_policy
from gsrl.policy.gaussian_mlp import GaussianMLPPolicy

STATE_DIM, ACTION_DIM, CHUNK, BATCH = 6, 3, 4, 5
SPEC = {"state": ((STATE_DIM,), "float32")}


def _policy(**kwargs: object) -> GaussianMLPPolicy:
    torch.manual_seed(0)
    policy = build_policy(
        "gaussian_mlp", SPEC, action_dim=ACTION_DIM, action_chunk=CHUNK, hidden_sizes=(32, 32), **kwargs
    )
    assert isinstance(policy, GaussianMLPPolicy) and isinstance(policy, Policy)
    return policy


def _obs(seed: int = 1, shift: float = 0.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(BATCH, STATE_DIM, generator=gen) + shift}


def test_shapes() -> None:
    policy = _policy()
    out = policy.act(_obs())
    assert out.action_chunk.shape == (BATCH, CHUNK, ACTION_DIM)
    assert out.logprobs.shape == out.values.shape == (BATCH,)
    assert not out.logprobs.requires_grad
    logprobs, entropy, values = policy.evaluate_actions(_obs(), out.action_chunk)
    assert logprobs.shape == entropy.shape == values.shape == (BATCH,)
    assert logprobs.requires_grad and values.requires_grad
    assert policy.value(_obs()).shape == (BATCH,)


def test_act_logprob_matches_evaluate_actions() -> None:
    policy = _policy()
    obs = _obs()
    out = policy.act(obs)
    logprobs, entropy, values = policy.evaluate_actions(obs, out.action_chunk)
    torch.testing.assert_close(logprobs.detach(), out.logprobs)
    torch.testing.assert_close(values.detach(), out.values)
    torch.testing.assert_close(policy.value(obs), out.values)
    # Entropy of C*A independent Normals with std exp(-0.5): C*A * (0.5 + 0.5*log(2*pi) - 0.5)
    expected_entropy = CHUNK * ACTION_DIM * (0.5 * torch.log(torch.tensor(2 * torch.pi)) + 0.5 - 0.5)
    torch.testing.assert_close(entropy.detach(), expected_entropy.expand(BATCH))


def test_deterministic_returns_mean_and_sampling_varies() -> None:
    policy = _policy()
    obs = _obs()
    mean, _, _ = policy(obs)
    first = policy.act(obs, deterministic=True)
    torch.testing.assert_close(first.action_chunk, mean.detach())
    torch.testing.assert_close(policy.act(obs, deterministic=True).action_chunk, first.action_chunk)
    assert not torch.equal(policy.act(obs).action_chunk, policy.act(obs).action_chunk)


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    source = _policy(obs_norm=True)
    source.update_obs_normalizer(_obs(seed=3, shift=2.0))
    with torch.no_grad():
        source.log_std.fill_(-1.3)
    torch.manual_seed(123)  # different init for the copy
    target = GaussianMLPPolicy(SPEC, ACTION_DIM, CHUNK, hidden_sizes=(32, 32), obs_norm=True)
    obs = _obs()
    actions = source.act(obs).action_chunk
    assert not torch.equal(
        target.act(obs, deterministic=True).action_chunk, source.act(obs, deterministic=True).action_chunk
    )
    target.load_state_dict(source.state_dict())
    assert {"obs_norm.mean", "obs_norm.var", "obs_norm.count"} <= set(source.state_dict())
    torch.testing.assert_close(
        target.act(obs, deterministic=True).action_chunk, source.act(obs, deterministic=True).action_chunk
    )
    for got, want in zip(target.evaluate_actions(obs, actions), source.evaluate_actions(obs, actions), strict=True):
        torch.testing.assert_close(got, want)


def test_obs_normalizer_moves_toward_data_mean_and_is_frozen_in_act() -> None:
    policy = _policy(obs_norm=True)
    data = {"state": torch.randn(1000, STATE_DIM) * 3.0 + 5.0}
    before = policy.act(_obs(), deterministic=True).action_chunk
    policy.act(data)  # acting must not update the statistics
    policy.evaluate_actions(data, torch.zeros(1000, CHUNK, ACTION_DIM))
    torch.testing.assert_close(policy.obs_norm.mean, torch.zeros(STATE_DIM))
    policy.update_obs_normalizer(data)
    torch.testing.assert_close(policy.obs_norm.mean, data["state"].mean(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(policy.obs_norm.var, data["state"].var(0, correction=0), atol=1e-2, rtol=1e-3)
    assert not torch.equal(policy.act(_obs(), deterministic=True).action_chunk, before)
    # A second batch merges with the first: the running mean lies between the two batch means.
    policy.update_obs_normalizer({"state": torch.full((1000, STATE_DIM), -5.0)})
    assert (policy.obs_norm.mean.abs() < 0.1).all()


def test_obs_normalizer_statistics_stay_float32_under_bf16_cast() -> None:
    policy = _policy(obs_norm=True)
    policy.update_obs_normalizer({"state": torch.randn(100, STATE_DIM) + 1.2345678})
    mean = policy.obs_norm.mean.clone()
    policy.to(torch.bfloat16)
    assert policy.log_std.dtype == torch.bfloat16
    assert policy.obs_norm.mean.dtype == torch.float32
    torch.testing.assert_close(policy.obs_norm.mean, mean, atol=0, rtol=0)
    out = policy.act(_obs())
    assert out.action_chunk.dtype == out.logprobs.dtype == torch.float32


def test_obs_normalizer_sums_moments_across_ranks() -> None:
    # Two "ranks" with different halves of the data must end with the statistics of the whole.
    data = torch.randn(200, STATE_DIM) * 2 + 1
    full = _policy(obs_norm=True)
    full.update_obs_normalizer({"state": data})
    halves = [data[:100], data[100:]]
    packed = []

    def capture(rank: int) -> object:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            packed.append((rank, tensor.clone()))
            return tensor

        return reduce

    for rank, half in enumerate(halves):
        _policy(obs_norm=True).update_obs_normalizer({"state": half}, all_reduce_sum=capture(rank))
    total = packed[0][1] + packed[1][1]
    ranked = _policy(obs_norm=True)
    ranked.update_obs_normalizer({"state": halves[0]}, all_reduce_sum=lambda _tensor: total)
    torch.testing.assert_close(ranked.obs_norm.mean, full.obs_norm.mean)
    torch.testing.assert_close(ranked.obs_norm.var, full.obs_norm.var)
