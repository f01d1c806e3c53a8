"""Observation dict -> model inputs: camera images, the normalized robot state, the tokenized prompt.

Kept apart from the network so the policy server, the learner and the SFT stage turn the same
observation into the same tokens (the PPO ratio is only 1 at unchanged weights if they do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gsrl.policy.base import DtypeStableBuffers, ObservationSpec


def default_image_keys(spec: ObservationSpec) -> list[str]:
    """Every uint8 entry of rank 3 ([H, W, 3] per env), in spec order."""
    return [key for key, (shape, dtype) in spec.items() if dtype == "uint8" and len(shape) == 3 and shape[-1] == 3]


def default_state_keys(spec: ObservationSpec) -> list[str]:
    """Every float32 vector entry ([D] per env), in spec order (e.g. ``agent/qpos``)."""
    return [key for key, (shape, dtype) in spec.items() if dtype == "float32" and len(shape) == 1]


def preprocess_images(images: Tensor, size: int) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, size, size] in [-1, 1], resized with padding (openpi).

    The aspect ratio is kept: the longer side becomes ``size`` and the rest is filled with black (-1),
    so objects are not squashed differently from one camera to another.
    """
    x = images.permute(0, 3, 1, 2).float() / 255.0
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x * 2.0 - 1.0


class StateNormalizer(DtypeStableBuffers):
    """Maps raw state to [-1, 1] with per-dim bounds (pi0.5's quantile form): 2 (x - low) / (high - low + 1e-6) - 1.

    ``low``/``high`` are float32 buffers (q01/q99 of the demonstrations, or joint limits); they travel with
    ``state_dict`` and therefore with every weight broadcast. Like ``RunningMeanStd`` they follow device
    moves but never dtype casts, so a bf16 learner and an fp32 policy server discretize identically.
    """

    def __init__(self, dim: int, low: Sequence[float] | None = None, high: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("low", torch.full((dim,), -1.0) if low is None else torch.tensor(low, dtype=torch.float32))
        self.register_buffer(
            "high", torch.full((dim,), 1.0) if high is None else torch.tensor(high, dtype=torch.float32)
        )
        if self.low.shape != (dim,) or self.high.shape != (dim,):
            raise ValueError(
                f"state bounds must have {dim} entries, got {list(self.low.shape)} / {list(self.high.shape)}"
            )
        if bool((self.high < self.low).any()):
            raise ValueError("state bounds: high < low")

    @torch.no_grad()
    def set_bounds(self, low: Tensor, high: Tensor) -> None:
        self.low.copy_(low.float())
        self.high.copy_(high.float())

    def forward(self, state: Tensor) -> Tensor:
        """[B, S] raw -> [B, S] float32 normalized."""
        low, high = self.low.to(state.device), self.high.to(state.device)
        return (state.float() - low) / (high - low + 1e-6) * 2.0 - 1.0
