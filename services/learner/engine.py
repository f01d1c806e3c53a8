"""``DeepSpeedEngine``: the ``OptimizerEngine`` of ``core.py`` on top of ``deepspeed.initialize``.

Built from a plain ``nn.Module`` and the algorithm config. The optimizer is a torch ``AdamW`` object
handed to DeepSpeed (a client optimizer) rather than a DeepSpeed "optimizer" config entry, because
builds with ``DS_BUILD_OPS=0`` (our CPU images) have no compiled FusedAdam/CPUAdam to JIT. With
``algo.critic_lr`` set it has two param groups, ``actor`` at ``lr`` and ``critic`` (the model's
``critic_parameters()``) at ``critic_lr``; DeepSpeed keeps a client optimizer's groups and their lrs.

The caller owns ``torch.distributed`` setup (``deepspeed.init_distributed(dist_backend=...)`` in
``__main__``/``server.py``); ``deepspeed.initialize`` would otherwise pick a backend itself.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import deepspeed
import torch
from torch import Tensor, nn


class OptimSettings(Protocol):
    """The fields of ``gsrl.config.AlgoConfig`` the optimizer reads."""

    lr: float
    # None: one group at ``lr``. Read with getattr, so settings without the field (``SFTSettings``) mean None.
    critic_lr: float | None
    max_grad_norm: float


def deepspeed_config(
    algo: OptimSettings, zero_stage: int, bf16: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ds_config dict. We call ``step`` once per PPO minibatch ourselves and mark micro-batches through
    ``set_gradient_accumulation_boundary`` (``DeepSpeedEngine.backward``), so DeepSpeed's own accumulation count
    stays 1 (it does not rescale our losses); batch sizes in ds_config only drive DeepSpeed's own dataloader and
    throughput logs, which we do not use (train_batch_size is left for DeepSpeed to derive from the world size)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": algo.max_grad_norm if algo.max_grad_norm > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW is fine, DeepSpeed just has not whitelisted it
        "zero_force_ds_cpu_optimizer": False,  # no compiled DeepSpeedCPUAdam with DS_BUILD_OPS=0
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,  # our metrics go through gsrl.metrics, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }
    if extra:
        config.update(extra)
    return config


def param_groups(model: nn.Module, algo: OptimSettings) -> list[dict[str, Any]]:
    """The optimizer's param groups over ``model``'s trainable parameters.

    Without ``algo.critic_lr``: one group at ``algo.lr``. With it: ``{"name": "actor", "lr": lr}`` and
    ``{"name": "critic", "lr": critic_lr}``, the critic group being the model's ``critic_parameters()``
    (``gsrl.policy.Policy``). A schedule that changes lrs later should scale each group from its own base
    lr, or the two collapse into one. ValueError when critic_lr is set but the model names no trainable
    critic parameters (the separate rate would silently apply to nothing).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    critic_lr = getattr(algo, "critic_lr", None)
    if critic_lr is None:
        return [{"params": trainable, "lr": algo.lr}]
    named = getattr(model, "critic_parameters", None)
    if named is None:
        raise ValueError(
            f"algo.critic_lr={critic_lr} needs a policy that names its critic (critic_parameters()); "
            f"{type(model).__name__} does not"
        )
    critic_ids = {id(p) for p in named()}
    critic = [p for p in trainable if id(p) in critic_ids]
    if not critic:
        raise ValueError(
            f"algo.critic_lr={critic_lr} is set but {type(model).__name__} has no trainable critic parameters "
            "(critic_parameters() is empty or frozen); unset algo.critic_lr"
        )
    actor = [p for p in trainable if id(p) not in critic_ids]
    groups = [{"name": "actor", "params": actor, "lr": algo.lr}] if actor else []
    return groups + [{"name": "critic", "params": critic, "lr": critic_lr}]


class DeepSpeedEngine:
    """``OptimizerEngine`` backed by a ``deepspeed.DeepSpeedEngine`` (ZeRO stage 0-3, optional bf16)."""

    def __init__(
        self,
        model: nn.Module,
        algo: OptimSettings,
        zero_stage: int = 1,
        bf16: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        groups = param_groups(model, algo)
        parameters = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=algo.lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.zero_stage = zero_stage
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=parameters,
            optimizer=optimizer,
            config=deepspeed_config(algo, zero_stage, bf16, extra_config),
        )

    @property
    def module(self) -> nn.Module:
        """The wrapped model (the same object that was passed in, possibly cast to bf16 and moved)."""
        return self.engine.module

    def backward(self, loss: Tensor, last: bool = True) -> None:
        """``last=False``: a micro-batch with more to come; DeepSpeed keeps its gradient local (no reduction) until
        the minibatch's last backward, whose ``step()`` then applies the accumulated sum."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip, step, zero grads; return the global grad norm before clipping.

        ZeRO 1-3 and the bf16 optimizer record that norm; plain stage 0 fp32 does not, so there we
        measure it from ``param.grad`` (already all-reduced by ``engine.backward``) before stepping.
        """
        own_norm = self._grad_norm_from_params() if self.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = own_norm if own_norm is not None else float("nan")
        return float(norm.item() if isinstance(norm, Tensor) else norm)

    def _grad_norm_from_params(self) -> float | None:
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
