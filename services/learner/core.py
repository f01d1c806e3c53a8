"""The learner's PPO update as plain Python: segments in, optimizer steps and RLinf-named metrics out.

No Redis, gRPC or torch.distributed here. The optimizer is behind ``OptimizerEngine`` (``TorchEngine``
for tests and single-process runs, ``services.learner.engine.DeepSpeedEngine`` for DeepSpeed), and the
one cross-rank operation the update needs (summing a small tensor) is injected as ``all_reduce_sum``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from gsrl.policy.base import Policy
from gsrl.rl import (
    clipped_value_loss,
    compute_gae,
    entropy_bonus,
    explained_variance,
    normalize_advantages,
    ppo_policy_loss,
)
from gsrl.trajectory import Segment


class AlgoSettings(Protocol):
    """The fields of ``gsrl.config.AlgoConfig`` that the update reads."""

    gamma: float
    gae_lambda: float
    clip_ratio: float
    value_clip: float
    value_coef: float
    entropy_coef: float
    update_epochs: int
    num_minibatches: int
    micro_batch_size: int
    normalize_advantages: bool
    target_kl: float


class OptimizerEngine(Protocol):
    optimizer: torch.optim.Optimizer  # its param groups: a critic warm-up sets the "actor" group's lr to 0

    def backward(self, loss: Tensor, last: bool = True) -> None:
        """Accumulate ``loss``'s gradient. ``last=False`` marks a micro-batch with more of its minibatch to come:
        a data-parallel engine then defers the gradient reduction to the minibatch's last backward."""
        ...

    def step(self) -> float:
        """Clip gradients, step the optimizer, zero gradients; return the global grad norm before clipping."""
        ...


class TorchEngine:
    """``torch.optim.AdamW`` + ``clip_grad_norm_``: the single-process ``OptimizerEngine``."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        max_grad_norm: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
    ) -> None:
        """``parameters``: the parameters, or param groups as torch optimizers take them (e.g. named "actor" and
        "critic", each with its own lr, as ``services.learner.engine.param_groups`` makes)."""
        items = list(parameters)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
        self.parameters = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: Tensor, last: bool = True) -> None:
        loss.backward()  # autograd accumulates into .grad; one process has nothing to reduce

    def step(self) -> float:
        # max_norm=inf measures without clipping when clipping is off (max_grad_norm <= 0).
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)


@dataclass
class RolloutBatch:
    """Flat per-transition tensors after GAE, N = sum of segment lengths (one row = one action chunk)."""

    observations: dict[str, Tensor]  # each [N, ...]
    action_chunks: Tensor  # [N, C, A]
    old_logprobs: Tensor  # [N] behaviour policy's chunk log-prob
    old_values: Tensor  # [N] behaviour policy's V(s), the anchor of value clipping
    advantages: Tensor  # [N] GAE, not normalized
    returns: Tensor  # [N] advantages + old_values
    rewards: Tensor  # [N] chunk-level rewards, for metrics
    instructions: list[str] | None = None  # [N] or None when the segments carry none
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> [N, ...], the policy's rollout extras

    @property
    def size(self) -> int:
        return int(self.advantages.shape[0])


def _segment_instructions(segment: Segment) -> list[str] | None:
    # A segment stores either one instruction per transition or one for the whole segment.
    if not segment.instructions:
        return None
    if len(segment.instructions) == segment.length:
        return list(segment.instructions)
    if len(segment.instructions) == 1:
        return list(segment.instructions) * segment.length
    raise ValueError(f"segment {segment.segment_id!r}: {len(segment.instructions)} instructions for T={segment.length}")


def build_rollout_batch(segments: list[Segment], algo: AlgoSettings) -> RolloutBatch:
    """GAE per segment (each segment is one env's consecutive steps), then concatenate along time."""
    if not segments:
        raise ValueError("build_rollout_batch needs at least one segment")
    advantages, returns = [], []
    for seg in segments:
        adv, ret = compute_gae(
            seg.rewards, seg.values, seg.next_values, seg.terminated, seg.truncated, algo.gamma, algo.gae_lambda
        )
        advantages.append(adv)
        returns.append(ret)
    extra_keys = set(segments[0].extras)
    for seg in segments[1:]:
        if set(seg.extras) != extra_keys:
            raise ValueError(
                f"segment {seg.segment_id!r} carries extras {sorted(seg.extras)}, others {sorted(extra_keys)}: "
                "segments of one update must come from the same kind of policy"
            )
    per_segment = [_segment_instructions(seg) for seg in segments]
    instructions = None
    if any(ins is not None for ins in per_segment):
        instructions = []
        for seg, ins in zip(segments, per_segment, strict=True):
            instructions += ins if ins is not None else [""] * seg.length
    return RolloutBatch(
        observations={key: torch.cat([seg.observations[key] for seg in segments]) for key in segments[0].observations},
        action_chunks=torch.cat([seg.action_chunks for seg in segments]).float(),
        old_logprobs=torch.cat([seg.logprobs for seg in segments]).float(),
        old_values=torch.cat([seg.values for seg in segments]).float(),
        advantages=torch.cat(advantages),
        returns=torch.cat(returns),
        rewards=torch.cat([seg.rewards for seg in segments]).float(),
        instructions=instructions,
        extras={key: torch.cat([seg.extras[key] for seg in segments]) for key in sorted(extra_keys)},
    )


# The scalars ``_micro_batch_loss`` stacks, in its order.
MINIBATCH_METRICS = (
    "actor/loss",
    "actor/policy_loss",
    "actor/value_loss",
    "actor/approx_kl",
    "actor/pg_clipfrac",
    "actor/value_clip_ratio",
    "actor/entropy",
)
_APPROX_KL = MINIBATCH_METRICS.index("actor/approx_kl")


class _StepRefused(NamedTuple):
    """A minibatch step not taken: its approximate KL (averaged over ranks) was above ``target_kl``."""

    approx_kl: float


@contextmanager
def _actor_held_still(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The param groups named "actor" (``services.learner.engine.param_groups``) at lr 0 inside, restored after.

    With weight decay 0 (the learner's) and lr 0, AdamW leaves those parameters exactly as they were.
    """
    groups = [group for group in optimizer.param_groups if group.get("name") == "actor"]
    if not groups:
        raise ValueError("a critic warm-up needs separate actor and critic param groups: set algo.critic_lr")
    saved = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr


class PPOLearnerCore:
    """Runs ``update_epochs`` x ``num_minibatches`` PPO steps on each batch of segments.

    ``target_kl`` stops an update before the optimizer step whose minibatch shows the policy already further than
    that from the rollouts' (the KL of that minibatch's forward pass), as Stable-Baselines3 does: the step that would
    go past the limit is not taken. The first step of an update always is: its KL measures how stale the rollouts
    are (an asynchronous learner trains on segments of earlier versions), not this update's drift, and refusing it
    could stall training on stale data. With micro-batches the KL is measured before the backward passes, in a
    forward pass without gradients over the minibatch (one more forward per step after the first).

    Data-parallel use: every rank must take the same number of optimizer steps or the gradient
    all-reduce deadlocks. Each rank therefore needs at least ``num_minibatches`` samples, and the
    ``target_kl`` early stop is decided on the KL averaged over ranks through ``all_reduce_sum``
    (which also keeps observation-normalizer statistics identical across ranks).
    """

    def __init__(
        self,
        policy: Policy,
        engine: OptimizerEngine,
        algo: AlgoSettings,
        generator: torch.Generator | None = None,
        all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.policy = policy
        self.engine = engine
        self.algo = algo
        self.generator = generator
        self.all_reduce_sum = all_reduce_sum

    def _device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _mean_across_ranks(self, value: float) -> float:
        if self.all_reduce_sum is None:
            return value
        total = self.all_reduce_sum(torch.tensor([value, 1.0], dtype=torch.float64, device=self._device()))
        return float(total[0] / total[1])

    def update(self, segments: list[Segment], critic_only: bool = False) -> dict[str, float]:
        """One PPO update on ``segments``; returns metrics averaged over the minibatch steps taken.

        ``critic_only`` (a critic warm-up update): the loss is the value loss alone and the optimizer's "actor"
        param group steps at lr 0, so the actor's parameters stay as the rollouts' policy had them while the critic
        fits the returns (an observation normalizer still takes in the batch, as in every update). ValueError when
        the optimizer has no "actor" group to hold still.
        """
        if not critic_only:
            return self._update(segments, critic_only=False)
        with _actor_held_still(self.engine.optimizer):
            return self._update(segments, critic_only=True)

    def _update(self, segments: list[Segment], critic_only: bool) -> dict[str, float]:
        algo = self.algo
        batch = build_rollout_batch(segments, algo)
        if batch.size < algo.num_minibatches:
            raise ValueError(f"{batch.size} samples cannot fill {algo.num_minibatches} minibatches")
        update_obs_normalizer = getattr(self.policy, "update_obs_normalizer", None)
        if callable(update_obs_normalizer):
            update_obs_normalizer(batch.observations, all_reduce_sum=self.all_reduce_sum)

        # Normalized once over the whole batch (RLinf), not per minibatch (CleanRL): same result
        # for large minibatches, and well defined for tiny ones.
        advantages = normalize_advantages(batch.advantages) if algo.normalize_advantages else batch.advantages
        device = self._device()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        stop: _StepRefused | None = None
        for _ in range(algo.update_epochs):
            perm = torch.randperm(batch.size, generator=self.generator)
            for idx in torch.tensor_split(perm, algo.num_minibatches):
                kl_limit = algo.target_kl if algo.target_kl > 0 and steps > 0 else None
                metrics = self._minibatch_step(batch, advantages, idx, device, critic_only, kl_limit)
                if isinstance(metrics, _StepRefused):  # the policy is already target_kl away: no more steps
                    stop = metrics
                    break
                for key, value in metrics.items():
                    sums[key] += value
                steps += 1
            if stop is not None:
                break

        out = {key: value / steps for key, value in sums.items()}
        out.update(
            {
                "rollout/returns_mean": float(batch.returns.mean()),
                "rollout/advantages_mean": float(batch.advantages.mean()),
                "rollout/values_mean": float(batch.old_values.mean()),
                "rollout/rewards_mean": float(batch.rewards.mean()),
                "actor/explained_variance": explained_variance(batch.old_values, batch.returns),
                "actor/num_samples": float(batch.size),
                "actor/num_minibatch_steps": float(steps),
                "actor/early_stopped": float(stop is not None),
                "actor/critic_only": float(critic_only),
            }
        )
        if stop is not None:  # what stopped it (the steps' own approx_kl mean leaves it out); only on such updates
            out["actor/stopping_approx_kl"] = stop.approx_kl
        return out

    def _minibatch_step(
        self,
        batch: RolloutBatch,
        advantages: Tensor,
        idx: Tensor,
        device: torch.device,
        critic_only: bool = False,
        kl_limit: float | None = None,
    ) -> dict[str, float] | _StepRefused:
        """One optimizer step on the samples ``idx``, in micro-batches of ``algo.micro_batch_size`` when set.

        Every loss term is a mean over samples, so weighting each micro-batch's loss by its share of the minibatch
        makes the accumulated gradient the whole minibatch's; the metrics are weighted the same way.

        ``kl_limit``: no step, and ``_StepRefused`` returned, when the minibatch's approximate KL (averaged over ranks)
        exceeds it; it is measured before any backward pass, so nothing is accumulated or reduced for a step not taken.
        """
        micro = self.algo.micro_batch_size
        parts = list(torch.split(idx, micro)) if 0 < micro < len(idx) else [idx]
        first: tuple[Tensor, Tensor] | None = None
        if kl_limit is not None:
            if len(parts) == 1:  # the forward pass the step needs anyway measures the KL
                first = self._micro_batch_loss(batch, advantages, idx, device, critic_only)
                kl = float(first[1][_APPROX_KL])
            else:  # micro-batches backpropagate as they go: measure the whole minibatch first, without gradients
                with torch.no_grad():
                    kl = sum(
                        float(self._micro_batch_loss(batch, advantages, part, device, critic_only)[1][_APPROX_KL])
                        * len(part)
                        / len(idx)
                        for part in parts
                    )
            mean_kl = self._mean_across_ranks(kl)
            if mean_kl > kl_limit:
                return _StepRefused(mean_kl)
        totals: Tensor | None = None
        for number, part in enumerate(parts):
            share = len(part) / len(idx)
            if first is not None:  # one part, already through its forward pass
                loss, scalars = first
            else:
                loss, scalars = self._micro_batch_loss(batch, advantages, part, device, critic_only)
            self.engine.backward(loss * share, last=number == len(parts) - 1)
            totals = scalars * share if totals is None else totals + scalars * share
        grad_norm = self.engine.step()
        # One device-to-host copy for all scalars instead of one sync per metric.
        return {**dict(zip(MINIBATCH_METRICS, totals.tolist(), strict=True)), "actor/grad_norm": float(grad_norm)}

    def _micro_batch_loss(
        self, batch: RolloutBatch, advantages: Tensor, idx: Tensor, device: torch.device, critic_only: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The PPO loss on the samples ``idx`` (means over them), and its ``MINIBATCH_METRICS`` stacked, detached.

        ``critic_only``: the value term alone (the policy and entropy terms are still measured)."""
        algo = self.algo
        observations = {key: value[idx].to(device, non_blocking=True) for key, value in batch.observations.items()}
        instructions = [batch.instructions[i] for i in idx.tolist()] if batch.instructions is not None else None
        # A flow policy recomputes its log-probs from the sampled denoising chain the rollout recorded.
        extras = {key: value[idx].to(device) for key, value in batch.extras.items()} or None
        logprobs, entropy, values = self.policy.evaluate_actions(
            observations, batch.action_chunks[idx].to(device), instructions=instructions, extras=extras
        )
        policy_loss, pg_metrics = ppo_policy_loss(
            logprobs, batch.old_logprobs[idx].to(device), advantages[idx].to(device), algo.clip_ratio
        )
        value_loss, value_clip_ratio = clipped_value_loss(
            values, batch.old_values[idx].to(device), batch.returns[idx].to(device), algo.value_clip
        )
        entropy_mean = entropy_bonus(entropy)
        loss = algo.value_coef * value_loss
        if not critic_only:
            loss = policy_loss + loss - algo.entropy_coef * entropy_mean
        scalars = torch.stack(
            [
                loss.detach().float(),
                policy_loss.detach().float(),
                value_loss.detach().float(),
                pg_metrics["approx_kl"].float(),
                pg_metrics["clipfrac"].float(),
                value_clip_ratio.to(loss.device).float(),
                entropy_mean.detach().float(),
            ]
        )
        return loss, scalars
