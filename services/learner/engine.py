"""``DeepSpeedEngine``: the ``OptimizerEngine`` of ``core.py`` on top of ``deepspeed.initialize``.

Built from a plain ``nn.Module`` and the algorithm config. The optimizer is a torch ``AdamW`` object
handed to DeepSpeed (a client optimizer) rather than a DeepSpeed "optimizer" config entry, because
builds with ``DS_BUILD_OPS=0`` (our CPU images) have no compiled FusedAdam/CPUAdam to JIT.

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
    max_grad_norm: float


def deepspeed_config(
    algo: OptimSettings, zero_stage: int, bf16: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ds_config dict. We call ``backward``/``step`` once per PPO minibatch ourselves, so the
    micro batch is nominally 1 and there is no gradient accumulation; batch sizes in ds_config only
    drive DeepSpeed's own dataloader and throughput logs, which we do not use (train_batch_size is
    left for DeepSpeed to derive from the world size)."""
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
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=algo.lr, betas=betas, eps=eps, weight_decay=weight_decay)
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

    def backward(self, loss: Tensor) -> None:
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
