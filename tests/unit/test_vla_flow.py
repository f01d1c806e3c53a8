"""Flow samplers and log-densities (gsrl.policy.vla.flow) against direct torch.distributions computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from gsrl.policy.vla import flow

B, H, D, C, A = 3, 4, 5, 3, 4  # chunk C x A is a strict slice of the model's [H, D]


def _x(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_timesteps_and_sde_noise_schedule_match_the_recipe() -> None:
    steps = flow.denoise_timesteps(5)
    assert torch.allclose(steps, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    t, dt = steps[:-1], steps[:-1] - steps[1:]
    sigma = flow.flow_sde_sigma(t, dt, noise_level=0.5)
    # t = 1 uses t_1 = 0.8 in the denominator: a sqrt(1 / 0.2) = a sqrt(5); t = 0.8 gives 2a.
    assert sigma[0].item() == pytest.approx(0.5 * math.sqrt(5), rel=1e-6)
    assert sigma[1].item() == pytest.approx(1.0, rel=1e-6)
    assert sigma[4].item() == pytest.approx(0.5 * math.sqrt(0.2 / 0.8), rel=1e-6)


def test_flow_sde_transition_matches_the_expanded_form_and_normal_log_prob() -> None:
    x, v, x_next = _x(0, B, H, D), _x(1, B, H, D), _x(2, B, H, D)
    t = torch.tensor([1.0, 0.6, 0.2])
    dt = torch.full((B,), 0.2)
    sigma = flow.flow_sde_sigma(t, dt, 0.5)
    mean, std = flow.flow_sde_transition(x, v, t, dt, sigma)
    tc, dtc, sc = t.view(B, 1, 1), dt.view(B, 1, 1), sigma.view(B, 1, 1)
    expected_mean = x - dtc * v - sc.pow(2) * dtc / (2 * tc) * (x + (1 - tc) * v)
    assert torch.allclose(mean, expected_mean, atol=1e-5)
    assert torch.allclose(std, (dtc.sqrt() * sc).expand_as(x))
    direct = Normal(expected_mean, (dtc.sqrt() * sc).expand_as(x)).log_prob(x_next)[:, :C, :A].sum(dim=(-2, -1))
    assert torch.allclose(flow.transition_logprob(x_next, mean, std, C, A), direct, atol=1e-4)


def test_flow_noise_transition_log_prob_and_entropy_match_normal() -> None:
    x, v, x_next = _x(0, B, H, D), _x(1, B, H, D), _x(2, B, H, D)
    std = flow.noise_std_from_logits(_x(3, B, H, D) * 3, (0.08, 0.16))
    assert float(std.min()) >= 0.08 - 1e-6 and float(std.max()) <= 0.16 + 1e-6
    mean, std_out = flow.flow_noise_transition(x, v, 0.25, std)
    assert torch.allclose(mean, x - 0.25 * v)
    dist = Normal(x - 0.25 * v, std)
    direct = dist.log_prob(x_next)[:, :C, :A].sum(dim=(-2, -1))
    assert torch.allclose(flow.transition_logprob(x_next, mean, std_out, C, A), direct, atol=1e-4)
    entropy = dist.entropy()[:, :C, :A].sum(dim=(-2, -1))
    assert torch.allclose(flow.transition_entropy(std_out, C, A), entropy, atol=1e-5)


def test_noise_std_range_is_in_std_units() -> None:
    logits = torch.tensor([-50.0, 0.0, 50.0])
    std = flow.noise_std_from_logits(logits, (0.08, 0.16))
    assert std[0].item() == pytest.approx(0.08, rel=1e-5)
    assert std[2].item() == pytest.approx(0.16, rel=1e-5)
    # logits 0 -> logvar halfway between log(0.08^2) and log(0.16^2): the geometric mean.
    assert std[1].item() == pytest.approx(math.sqrt(0.08 * 0.16), rel=1e-5)


def test_zero_noise_is_the_ode() -> None:
    x, v = _x(0, B, H, D), _x(1, B, H, D)
    t, dt = torch.tensor([1.0, 0.5, 0.25]), 0.25
    mean, std = flow.flow_sde_transition(x, v, t, dt, flow.flow_sde_sigma(t, torch.tensor(dt), 0.0))
    assert torch.allclose(mean, flow.ode_step(x, v, dt), atol=1e-6)
    assert bool((std == 0).all())
    assert bool((flow.gaussian_logprob(x, mean, std) == 0).all())

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x_t - 0.3, None

    x1 = _x(4, B, H, D)
    all_sde = flow.sample_chain(velocity, x1, 4, torch.ones(B, 4, dtype=torch.bool), "flow_sde", noise_level=0.0)
    all_ode = flow.sample_chain(velocity, x1, 4, torch.zeros(B, 4, dtype=torch.bool), "flow_sde", noise_level=0.5)
    assert torch.allclose(all_sde.chain, all_ode.chain, atol=1e-6)


def test_chain_log_prob_is_the_sum_of_its_transitions() -> None:
    """Sampling then scoring the chain step by step with Normal gives the same per-row total."""

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = x_t - 0.5 * t.view(-1, 1, 1)
        return v, flow.noise_std_from_logits(torch.tanh(x_t), (0.08, 0.16))

    torch.manual_seed(0)
    steps = 4
    for method in flow.NOISE_METHODS:
        for joint in (True, False):
            mask = flow.stochastic_step_mask(B, steps, joint)
            assert bool((mask.sum(1) == (steps if joint else 1)).all())
            sample = flow.sample_chain(velocity, _x(5, B, H, D), steps, mask, method, noise_level=0.5)
            grid = flow.denoise_timesteps(steps)
            total = torch.zeros(B)
            for k in range(steps):
                x_t, x_next = sample.chain[:, k], sample.chain[:, k + 1]
                v, noise_std = velocity(x_t, grid[k].expand(B))
                mean, std = flow.transition(method, x_t, v, grid[k].expand(B), grid[k] - grid[k + 1], 0.5, noise_std)
                for row in range(B):
                    if mask[row, k]:
                        total[row] += Normal(mean[row], std[row]).log_prob(x_next[row])[:C, :A].sum()
                    else:  # an ODE step is exactly the Euler step, no noise
                        assert torch.allclose(x_next[row], flow.ode_step(x_t[row], v[row], 0.25), atol=1e-6)
            terms = flow.transition_logprob(sample.chain[:, 1:], sample.means, sample.stds, C, A)
            summed = flow.reduce_chain(terms[mask].view(B, -1), "sum")
            assert torch.allclose(summed, total, atol=1e-3), (method, joint)
            prior = flow.standard_normal_logprob(sample.chain[:, 0], C, A)
            direct_prior = Normal(0.0, 1.0).log_prob(sample.chain[:, 0])[:, :C, :A].sum(dim=(-2, -1))
            assert torch.allclose(prior, direct_prior, atol=1e-4)
            mean_red = flow.reduce_chain(terms[mask].view(B, -1), "mean", prior)
            assert torch.allclose(mean_red, (prior + total) / (mask.sum(1) + 1), atol=1e-3)


def test_flow_matching_targets_interpolate_noise_and_data() -> None:
    actions, noise = _x(0, B, H, D), _x(1, B, H, D)
    x_t, u = flow.flow_matching_targets(actions, noise, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.allclose(x_t[0], noise[0]) and torch.allclose(x_t[1], actions[1])
    assert torch.allclose(x_t[2], 0.5 * (noise[2] + actions[2]))
    assert torch.allclose(u, noise - actions)
    # Integrating the exact velocity with the ODE recovers the data from the noise.
    chain = flow.sample_chain(
        lambda x, t: (noise - actions, None), noise, 5, torch.zeros(B, 5, dtype=torch.bool), "flow_sde"
    )
    assert torch.allclose(chain.actions, actions, atol=1e-5)
    t = flow.sample_flow_time(1000)
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    assert float(t.mean()) > 0.55  # Beta(1.5, 1) has mean 0.6: skewed toward noise
