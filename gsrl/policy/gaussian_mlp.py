"""A small Gaussian policy with a separate critic: fast PPO runs and tests (CleanRL's agent).

From state alone it is CleanRL's agent; when the observation spec carries camera frames (uint8 [H, W, 3], as the
Gaussian-splat task sends), a NatureCNN per camera (``gsrl.policy.encoders``) feeds the actor and the critic the
image features next to the (normalized) proprioceptive state, as ManiSkill's PPO-from-pixels baseline does.

Actions are sampled from N(mean(s), std) without squashing; the env clips to [-1, 1]. The log-prob
is that of the unclipped sample, summed over the chunk and the action dims, so the PPO ratio is one
number per chunk (RLinf's ``chunk_level``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from gsrl.policy.base import DtypeStableBuffers, ObservationSpec, Policy, PolicyOutput
from gsrl.policy.encoders import MultiCameraEncoder, image_keys_of


class RunningMeanStd(DtypeStableBuffers):
    """Running per-feature mean and variance of observations, stored as float32 buffers.

    Buffers travel with ``state_dict`` (and so with every weight broadcast), so a policy server and
    a learner holding the same weights normalize identically. Only ``update`` changes them; the
    learner calls it once per PPO update, never inside ``act``/``evaluate_actions``.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.clip = clip
        self.eps = eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4))  # gym's prior: the first batch dominates

    @torch.no_grad()
    def update(self, x: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Merge a batch ``x`` [N, *shape] into the statistics (Chan et al.'s parallel update).

        ``all_reduce_sum`` (e.g. a ``dist.all_reduce`` wrapper) sums the batch moments across data-parallel
        ranks first, so every rank ends with the same buffers.
        """
        x = x.detach().to(torch.float64).reshape(-1, *self.mean.shape)
        packed = torch.cat([x.new_tensor([x.shape[0]]), x.sum(0).flatten(), x.pow(2).sum(0).flatten()])
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        packed = packed.to(self.mean.device)
        n = self.mean.numel()
        batch_count = packed[0]
        if batch_count.item() == 0:
            return
        batch_mean = (packed[1 : 1 + n] / batch_count).view_as(self.mean)
        batch_var = (packed[1 + n :] / batch_count).view_as(self.mean) - batch_mean.pow(2)
        mean, var, count = self.mean.double(), self.var.double(), self.count.double()
        total = count + batch_count
        delta = batch_mean - mean
        new_mean = mean + delta * batch_count / total
        m2 = var * count + batch_var.clamp_min(0) * batch_count + delta.pow(2) * count * batch_count / total
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: Tensor) -> Tensor:
        """(x - mean) / sqrt(var + eps), clipped to +-clip; float32."""
        return ((x.float() - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


def _layer_init(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int, out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [_layer_init(nn.Linear(in_dim, size), math.sqrt(2)), nn.Tanh()]
        in_dim = size
    layers.append(_layer_init(nn.Linear(in_dim, out_dim), out_std))
    return nn.Sequential(*layers)


class GaussianMLPPolicy(Policy):
    """Actor MLP -> C*A means, critic MLP -> V(s), state-independent learned log-std [C, A].

    Reads observation key ``state_key`` ([B, D] float). With ``obs_norm`` the state is normalized by a
    ``RunningMeanStd`` that the learner updates through ``update_obs_normalizer``. Camera frames in the spec
    (``image_keys``, by default every uint8 [H, W, 3] entry) go through one shared-trunk image encoder whose
    ``image_features`` per camera are concatenated with the state; actor and critic both read that vector.
    """

    def __init__(
        self,
        observation_spec: ObservationSpec,
        action_dim: int,
        action_chunk: int,
        hidden_sizes: Sequence[int] = (256, 256),
        init_log_std: float = -0.5,
        obs_norm: bool = False,
        obs_clip: float = 10.0,
        state_key: str = "state",
        image_keys: Sequence[str] | None = None,
        image_features: int = 256,
    ) -> None:
        super().__init__()
        if state_key not in observation_spec:
            raise ValueError(f"observation_spec has no {state_key!r} key (has {sorted(observation_spec)})")
        state_shape = tuple(observation_spec[state_key][0])
        if len(state_shape) != 1:
            raise ValueError(f"{state_key!r} must be a flat vector [D], got shape {state_shape}")
        self.state_key = state_key
        self.action_dim = action_dim
        self.action_chunk = action_chunk
        state_dim = state_shape[0]
        self.obs_norm = RunningMeanStd(state_shape, clip=obs_clip) if obs_norm else None
        image_keys = image_keys_of(observation_spec) if image_keys is None else list(image_keys)
        missing = [key for key in image_keys if key not in observation_spec]
        if missing:
            raise ValueError(f"image_keys {missing} are not in the observation spec (has {sorted(observation_spec)})")
        self.image_encoder = MultiCameraEncoder(observation_spec, image_keys, image_features) if image_keys else None
        in_dim = state_dim + (self.image_encoder.out_features if self.image_encoder is not None else 0)
        self.actor = _mlp(in_dim, hidden_sizes, action_chunk * action_dim, out_std=0.01)
        self.critic = _mlp(in_dim, hidden_sizes, 1, out_std=1.0)
        self.log_std = nn.Parameter(torch.full((action_chunk, action_dim), float(init_log_std)))

    def forward(self, observations: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(mean [B, C, A], std [B, C, A], values [B]), float32.

        Everything that touches a parameter happens here, inside ``__call__``, so ZeRO-3's module hooks
        gather ``log_std`` too (a top-level parameter read outside forward would still be partitioned).
        """
        param = self.log_std
        state = observations[self.state_key].to(device=param.device, dtype=torch.float32)
        if self.obs_norm is not None:
            state = self.obs_norm.normalize(state)
        state = state.to(param.dtype)  # bf16 weights under DeepSpeed bf16
        if self.image_encoder is not None:
            state = torch.cat([self.image_encoder(observations), state], dim=-1)
        mean = self.actor(state).float().view(-1, self.action_chunk, self.action_dim)
        std = self.log_std.float().exp().expand_as(mean)
        values = self.critic(state).float().squeeze(-1)
        return mean, std, values

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic MLP; the image encoder feeds actor and critic alike, so it stays with the actor."""
        return list(self.critic.parameters())

    @torch.no_grad()
    def act(
        self,
        observations: dict[str, Tensor],
        instructions: list[str] | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        mean, std, values = self(observations)
        dist = Normal(mean, std)
        action_chunk = mean if deterministic else dist.sample()
        logprobs = dist.log_prob(action_chunk).sum(dim=(-2, -1))
        return PolicyOutput(action_chunk=action_chunk, logprobs=logprobs, values=values)

    def evaluate_actions(
        self,
        observations: dict[str, Tensor],
        action_chunk: Tensor,
        instructions: list[str] | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, std, values = self(observations)
        dist = Normal(mean, std)
        logprobs = dist.log_prob(action_chunk.to(device=mean.device, dtype=torch.float32)).sum(dim=(-2, -1))
        entropy = dist.entropy().sum(dim=(-2, -1))
        return logprobs, entropy, values

    @torch.no_grad()
    def value(self, observations: dict[str, Tensor], instructions: list[str] | None = None) -> Tensor:
        return self(observations)[2]

    @torch.no_grad()
    def update_obs_normalizer(
        self, observations: dict[str, Tensor], all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Fold a batch of observations into the running statistics (no-op without ``obs_norm``).

        Called by the learner before each PPO update; the new statistics reach policy servers with the weights.
        """
        if self.obs_norm is not None:
            self.obs_norm.update(observations[self.state_key], all_reduce_sum=all_reduce_sum)
