"""Flow-matching samplers and the log-densities PPO needs, as pure functions (pi_RL, arXiv 2510.25889).

Convention (openpi): t = 1 is noise, t = 0 is data; x_t = t * noise + (1 - t) * action, the model
predicts v = noise - action, and sampling integrates from t = 1 down to 0 on the grid
t_k = linspace(1, 1/N, N) followed by 0 (step size dt = 1/N). Shapes: B batch, H action horizon,
D model action size, N denoising steps.

A flow policy's action has no tractable density, but the denoising chain x_1 -> x_{t_1} -> ... -> x_0
does once some transitions are Gaussian. Two ways to make them Gaussian (RLinf):

- Flow-SDE: the ODE becomes the marginal-preserving reverse SDE, one Euler-Maruyama step
  mean = x0_hat (1 - (t - dt)) + x1_hat (t - dt - sigma^2 dt / (2t)), std = sqrt(dt) sigma, with
  x0_hat = x_t - v t, x1_hat = x_t + v (1 - t) and sigma = a sqrt(t / (1 - t')), t' = t except t = 1 -> t_1.
- Flow-Noise: the plain Euler mean x_t - dt v plus a learned per-element std (``noise_std_from_logits``).

Which steps are stochastic is a [B, N] bool mask: all of them ("joint" log-prob) or one uniformly drawn
step per row with ODE elsewhere (RLinf's flow_sde default). The log-prob of a chain is the sum of the
stochastic transitions' Gaussian log-densities over the first C x A entries of each [H, D] step
(RLinf slices to the executed chunk and env action dims); deterministic steps contribute nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

NoiseMethod = Literal["flow_sde", "flow_noise"]
NOISE_METHODS: tuple[str, ...] = ("flow_sde", "flow_noise")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def denoise_timesteps(num_steps: int, device: torch.device | str | None = None) -> Tensor:
    """[N + 1] float32: linspace(1, 1/N, N) then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32, device=device)
    return torch.cat([grid, grid.new_zeros(1)])


def _col(t: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or [B] tensor as [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim())) if t.dim() else t


def ode_step(x_t: Tensor, v: Tensor, dt: Tensor | float) -> Tensor:
    """Euler step toward data: x_{t - dt} = x_t - dt * v. ``dt`` scalar or [B]."""
    return x_t - _col(dt, x_t) * v


def flow_sde_sigma(t: Tensor, dt: Tensor | float, noise_level: float) -> Tensor:
    """sigma_t = a sqrt(t / (1 - t')), t' = t except at t = 1 where t' = t_1 = 1 - dt (RLinf).

    ``t`` [B] (or any shape) with matching or scalar ``dt``. For N = 5 and a = 0.5: sigma_0 = a sqrt(5).
    """
    dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
    t_prime = torch.where(t >= 1.0, 1.0 - dt, t)
    return noise_level * torch.sqrt(t / (1.0 - t_prime))


def flow_sde_transition(
    x_t: Tensor, v: Tensor, t: Tensor | float, dt: Tensor | float, sigma: Tensor | float
) -> tuple[Tensor, Tensor]:
    """(mean, std) of x_{t - dt} given x_t under the Flow-SDE Euler-Maruyama step; t, dt, sigma scalar or [B].

    ``std`` is broadcast to x_t's shape. sigma = 0 gives exactly the ODE step.
    """
    t, dt, sigma = _col(t, x_t), _col(dt, x_t), _col(sigma, x_t)
    x0_hat = x_t - v * t
    x1_hat = x_t + v * (1.0 - t)
    mean = x0_hat * (1.0 - (t - dt)) + x1_hat * (t - dt - sigma.pow(2) * dt / (2.0 * t))
    std = (torch.sqrt(dt) * sigma).expand_as(x_t)
    return mean, std


def flow_noise_transition(x_t: Tensor, v: Tensor, dt: Tensor | float, std: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) under Flow-Noise: the Euler mean and the noise head's std [B, H, D] (not scaled by dt)."""
    return ode_step(x_t, v, dt), std.expand_as(x_t)


def noise_std_from_logits(logits: Tensor, std_range: tuple[float, float]) -> Tensor:
    """RLinf ExploreNoiseNet: logvar = lo + (hi - lo) (tanh(logits) + 1) / 2, std = exp(logvar / 2).

    ``std_range`` is in std units: logvar spans [log(min^2), log(max^2)] so std lies in [min, max].
    """
    lo, hi = (2.0 * math.log(s) for s in std_range)
    logvar = lo + (hi - lo) * (torch.tanh(logits) + 1.0) * 0.5
    return torch.exp(0.5 * logvar)


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Elementwise log N(x | mean, std^2); 0 where std == 0 (a deterministic step has no density term)."""
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    logp = -torch.log(safe) - _LOG_SQRT_2PI - 0.5 * ((x - mean) / safe).pow(2)
    return torch.where(stochastic, logp, torch.zeros_like(logp))


def gaussian_entropy(std: Tensor) -> Tensor:
    """Elementwise 0.5 log(2 pi e std^2); 0 where std == 0."""
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    ent = 0.5 + _LOG_SQRT_2PI + torch.log(safe)
    return torch.where(stochastic, ent, torch.zeros_like(ent))


def transition_logprob(x_next: Tensor, mean: Tensor, std: Tensor, chunk: int, action_dim: int) -> Tensor:
    """Log-density of one transition per row: [..., H, D] -> [...], summed over the first C x A entries."""
    logp = gaussian_logprob(x_next.float(), mean.float(), std.float())
    return logp[..., :chunk, :action_dim].sum(dim=(-2, -1))


def transition_entropy(std: Tensor, chunk: int, action_dim: int) -> Tensor:
    """Entropy of one transition per row, over the first C x A entries: [..., H, D] -> [...]."""
    return gaussian_entropy(std.float())[..., :chunk, :action_dim].sum(dim=(-2, -1))


def standard_normal_logprob(x1: Tensor, chunk: int, action_dim: int) -> Tensor:
    """log N(x_1 | 0, I) over the first C x A entries: [B, H, D] -> [B] (parameter-free prior term)."""
    return gaussian_logprob(x1.float(), torch.zeros_like(x1, dtype=torch.float32), torch.ones_like(x1.float()))[
        ..., :chunk, :action_dim
    ].sum(dim=(-2, -1))


def reduce_chain(step_terms: Tensor, reduction: str = "sum", prior_term: Tensor | None = None) -> Tensor:
    """Per-step terms [B, S] (log-probs or entropies of the stochastic steps) -> chain value [B].

    ``sum``: the chain's log-density (the prior N(0, I) term is parameter-free, cancels in the PPO ratio and
    is left out). ``mean``: RLinf's joint_logprob aggregation, (prior + sum of steps) / (S + 1), which
    shrinks the ratio's log by S + 1; ``prior_term`` [B] is then required.
    """
    if reduction == "sum":
        return step_terms.sum(dim=1)
    if reduction == "mean":
        if prior_term is None:
            raise ValueError("reduction='mean' needs the prior term")
        return (prior_term + step_terms.sum(dim=1)) / (step_terms.shape[1] + 1)
    raise ValueError(f"unknown chain reduction {reduction!r}; use 'sum' or 'mean'")


def transition(
    method: str,
    x_t: Tensor,
    v: Tensor,
    t: Tensor,
    dt: Tensor | float,
    noise_level: float = 0.5,
    noise_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(mean, std) of the stochastic transition from x_t [B, H, D] at times t [B] for either method."""
    if method == "flow_sde":
        return flow_sde_transition(x_t, v, t, dt, flow_sde_sigma(t, dt, noise_level))
    if method == "flow_noise":
        if noise_std is None:
            raise ValueError("flow_noise needs the noise head's std")
        return flow_noise_transition(x_t, v, dt, noise_std)
    raise ValueError(f"unknown noise method {method!r}; known: {NOISE_METHODS}")


def stochastic_step_mask(
    batch: int, num_steps: int, joint: bool, device: torch.device | str | None = None, generator=None
) -> Tensor:
    """[B, N] bool: all steps (``joint``) or one uniformly drawn step per row (the others are ODE).

    RLinf draws one index per rollout call for the whole batch; drawing per row has the same per-sample
    distribution and decorrelates the batch. Every row has the same count of stochastic steps, which lets
    ``evaluate_actions`` gather them into one dense [B, S] batch.
    """
    if joint:
        return torch.ones(batch, num_steps, dtype=torch.bool, device=device)
    index = torch.randint(num_steps, (batch,), device=device, generator=generator)
    return torch.nn.functional.one_hot(index, num_steps).bool()


# (x_t [B, H, D], t [B]) -> (v [B, H, D], flow-noise std [B, H, D] or None)
VelocityFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


@dataclass
class FlowChain:
    """A sampled denoising chain; the first three fields are what a rollout must keep for PPO."""

    chain: Tensor  # [B, N + 1, H, D] float32: x_1 (the initial noise), x_{t_1}, ..., x_0
    stochastic: Tensor  # [B, N] bool: which transitions were Gaussian
    means: Tensor  # [B, N, H, D] transition means
    stds: Tensor  # [B, N, H, D] transition stds (0 on ODE steps)

    @property
    def actions(self) -> Tensor:
        """x_0 [B, H, D]."""
        return self.chain[:, -1]


def sample_chain(
    velocity_fn: VelocityFn,
    x1: Tensor,
    num_steps: int,
    stochastic: Tensor,
    method: str,
    noise_level: float = 0.5,
    generator: torch.Generator | None = None,
) -> FlowChain:
    """Integrate from x_1 = ``x1`` [B, H, D] to x_0 with N steps; rows marked in ``stochastic`` [B, N] add noise.

    All flow arithmetic is float32 (or float64 when x1 is) whatever the network's dtype, because PPO ratios
    of bf16 log-densities are too coarse.
    """
    dtype = torch.promote_types(x1.dtype, torch.float32)
    x = x1.to(dtype)
    timesteps = denoise_timesteps(num_steps, device=x.device).to(dtype)
    batch = x.shape[0]
    chain, means, stds = [x], [], []
    for k in range(num_steps):
        t = timesteps[k].expand(batch)
        dt = timesteps[k] - timesteps[k + 1]
        v, noise_std = velocity_fn(x, t)
        v = v.to(dtype)
        noise_std = noise_std.to(dtype) if noise_std is not None else None
        mean, std = transition(method, x, v, t, dt, noise_level, noise_std)
        std = torch.where(stochastic[:, k].reshape(batch, 1, 1), std, torch.zeros_like(std))
        ode = ode_step(x, v, dt)
        # ODE rows take the plain Euler step (equal to the SDE mean at sigma = 0, cheaper and exact).
        mean = torch.where(stochastic[:, k].reshape(batch, 1, 1), mean, ode)
        noise = torch.randn(x.shape, dtype=dtype, device=x.device, generator=generator)
        x = mean + std * noise
        chain.append(x)
        means.append(mean)
        stds.append(std)
    return FlowChain(
        chain=torch.stack(chain, dim=1), stochastic=stochastic, means=torch.stack(means, 1), stds=torch.stack(stds, 1)
    )


def sample_flow_time(
    batch: int,
    distribution: str = "beta",
    device: torch.device | str | None = None,
    alpha: float = 1.5,
    beta: float = 1.0,
    scale: float = 0.999,
    offset: float = 0.001,
) -> Tensor:
    """Flow-matching training times [B]: pi0's Beta(1.5, 1) * 0.999 + 0.001 (skewed toward noise) or uniform."""
    if distribution == "beta":
        sample = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(beta)).sample((batch,))
    elif distribution == "uniform":
        sample = torch.rand(batch)
    else:
        raise ValueError(f"unknown time distribution {distribution!r}; use 'beta' or 'uniform'")
    return (sample * scale + offset).to(device=device, dtype=torch.float32)


def flow_matching_targets(actions: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, u_t): x_t = t noise + (1 - t) actions, u_t = noise - actions; actions/noise [B, H, D], t [B]."""
    tc = _col(t, actions)
    return tc * noise + (1.0 - tc) * actions, noise - actions
