"""The policy interface that policy servers (``act``) and learners (``evaluate_actions``) call.

A policy maps a batch of observations (a dict of tensors, keys and shapes from the task's
observation spec) plus optional language instructions to an action chunk ``[B, C, A]`` in the
normalized action space, the log-probability of the whole chunk (one PPO ratio per chunk, RLinf's
``chunk_level``), and a chunk-level value estimate V(s). Policies are built by name from a registry
so the config selects one without the services importing model code they do not use.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from gsrl.config import PolicyConfig

# One entry per observation key: (shape without the batch dim, dtype name such as "float32" or "uint8").
ObservationSpec = dict[str, tuple[tuple[int, ...], str]]


@dataclass
class PolicyOutput:
    """What ``Policy.act`` returns for a batch of B observations (float32, no grad).

    ``extras``: per-row tensors [B, ...] that ``evaluate_actions`` needs besides the observations and the
    chunk to recompute ``logprobs``. A flow policy's chunk has no density of its own, only its sampled
    denoising chain does, so the rollout must carry the chain. The policy server stores each entry in
    the segment as ``extras/<name>`` ([T, ...]) and the learner passes the minibatch rows back as
    ``evaluate_actions(..., extras={name: [N, ...]})``. Empty for policies that need nothing (Gaussian).
    """

    action_chunk: Tensor  # [B, C, A]
    logprobs: Tensor  # [B] log-prob of the whole chunk (sum over C and A)
    values: Tensor  # [B]
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, ...]


class Policy(nn.Module, abc.ABC):
    """Base class of every policy; ``action_chunk`` = C actions per step, ``action_dim`` = A."""

    action_dim: int
    action_chunk: int

    @abc.abstractmethod
    def act(
        self,
        observations: dict[str, Tensor],
        instructions: list[str] | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        """Sample (or, if ``deterministic``, take the mode of) an action chunk per observation. No grad."""

    @abc.abstractmethod
    def evaluate_actions(
        self,
        observations: dict[str, Tensor],
        action_chunk: Tensor,
        instructions: list[str] | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(logprobs [B], entropy [B], values [B]) of given chunks [B, C, A] under the current weights, with grad.

        ``extras`` are the rows of ``PolicyOutput.extras`` recorded when the chunks were sampled.
        """

    @abc.abstractmethod
    def value(self, observations: dict[str, Tensor], instructions: list[str] | None = None) -> Tensor:
        """V(s) [B], no grad (bootstrap values at segment ends and truncations)."""

    def critic_parameters(self) -> list[nn.Parameter]:
        """The parameters only the value estimate uses (the critic / value head), frozen ones included.

        The learner trains these at ``algo.critic_lr`` and everything else at ``algo.lr``: pi_RL / RLinf move a
        pretrained VLA's actor slowly (7.9e-6) while the freshly initialised value head has to catch up with the
        returns quickly (1.55e-4). Each policy names its own value head here, so the optimizer's groups follow the
        model's structure rather than guesses from parameter names. Parameters shared by actor and critic (an
        encoder or backbone both read) are not the critic's: they stay at ``lr``. The default (none) is for a
        policy without a separate value head; the learner then refuses ``critic_lr``.
        """
        return []


class DtypeStableBuffers(nn.Module):
    """A module of float32 statistics buffers that follow device moves but never dtype casts.

    ``model.bfloat16()`` must not round observation statistics, or a bf16 policy server and an fp32 learner would
    normalize the same input differently. Subclasses hold buffers only (no parameters, no children).
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DtypeStableBuffers:  # type: ignore[override]
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(device=moved.device)
        return self


PolicyFactory = Callable[..., Policy]

# Lazy "module:attribute" entries keep heavy model code (the VLA, transformers) unimported until asked for.
_REGISTRY: dict[str, str | PolicyFactory] = {
    "gaussian_mlp": "gsrl.policy.gaussian_mlp:GaussianMLPPolicy",
    "vla": "gsrl.policy.vla.policy:VLAPolicy",
}


def register_policy(kind: str, factory: str | PolicyFactory) -> None:
    """Add a policy kind: a callable ``(observation_spec, action_dim, action_chunk, **kwargs) -> Policy``
    or a lazy ``"package.module:Name"`` string."""
    _REGISTRY[kind] = factory


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def build_policy(
    kind: str,
    observation_spec: ObservationSpec,
    action_dim: int,
    action_chunk: int,
    **kwargs: object,
) -> Policy:
    """Build a policy by registry name; ``kwargs`` are the kind's own options (hidden sizes, ...)."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown policy kind {kind!r}; known: {available_policies()}")
    factory = _REGISTRY[kind]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory(observation_spec, action_dim=action_dim, action_chunk=action_chunk, **kwargs)


def load_model_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a checkpoint: ``path`` is ``model.safetensors``, a shard index, or a directory holding
    either (``gsrl.checkpoint_files``).

    The one reader of a checkpoint's weights for every role (serving, evaluation, videos, checks, the learner's
    resume), so what a checkpoint means is defined once and no service imports another's internals for it.
    FileNotFoundError names the path.
    """
    from gsrl.checkpoint_files import load_weights

    return load_weights(path)


def load_weights_file(policy: Policy, path: str | Path) -> None:
    """Load a checkpoint's weights (``load_model_weights``) into ``policy``, strictly.

    How a policy server or a learner starts from a trained checkpoint (``policy.checkpoint``) instead of its
    random initialisation; FileNotFoundError / RuntimeError name the path and the mismatching keys.
    """
    state = load_model_weights(path)
    try:
        policy.load_state_dict(state)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} does not fit this policy: {exc}") from exc


def build_configured_policy(policy: PolicyConfig, observation_spec: ObservationSpec, action_dim: int) -> Policy:
    """The run's policy (``config.policy``), started from ``policy.checkpoint`` when one is set.

    The VLA takes its checkpoint as a constructor option (it also reads LeRobot names); every other kind loads the
    file here, so policy servers and learners start from the same weights.
    """
    built = build_policy(policy.kind, observation_spec, action_dim, policy.action_chunk, **policy.kwargs())
    if policy.checkpoint and "checkpoint" not in policy.kwargs():
        load_weights_file(built, policy.checkpoint)
    return built
