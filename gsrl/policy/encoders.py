"""Image encoders for the small policies: camera frames (uint8 [B, H, W, 3]) -> feature vectors.

The encoder is ManiSkill's PPO-from-pixels baseline (a NatureCNN: three strided convolutions and a linear
projection), which learns PickCube-class tasks from 128x128 frames. It is deliberately small: the image-based
``make run`` preset trains on a CPU box, and the VLA (``gsrl.policy.vla``) is the model for real work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gsrl.policy.base import ObservationSpec


def image_keys_of(observation_spec: ObservationSpec) -> list[str]:
    """The camera entries of a spec: uint8 [H, W, 3] observations, sorted by key so every role agrees."""
    return sorted(
        key
        for key, (shape, dtype) in observation_spec.items()
        if dtype == "uint8" and len(shape) == 3 and shape[-1] == 3
    )


def frames_to_float(frames: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [B, H, W, 3] -> [B, 3, H, W] in [0, 1] (channels first, as convolutions want)."""
    return frames.permute(0, 3, 1, 2).to(dtype) / 255.0


class NatureCNN(nn.Module):
    """conv 8x8/4 (32) -> conv 4x4/2 (64) -> conv 3x3/1 (64) -> linear ``features``, ReLU throughout."""

    def __init__(self, height: int, width: int, features: int = 256) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, 3, height, width)).shape[-1]
        self.project = nn.Sequential(nn.Linear(flat, features), nn.ReLU())
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.orthogonal_(module.weight, math.sqrt(2))
                nn.init.zeros_(module.bias)
        self.features = features

    def forward(self, frames: Tensor) -> Tensor:
        """uint8 [B, H, W, 3] -> [B, features]."""
        weight = self.convs[0].weight
        return self.project(self.convs(frames_to_float(frames.to(weight.device), weight.dtype)))


class MultiCameraEncoder(nn.Module):
    """One NatureCNN per camera key; the features are concatenated in key order."""

    def __init__(self, observation_spec: ObservationSpec, image_keys: list[str], features: int = 256) -> None:
        super().__init__()
        if not image_keys:
            raise ValueError("MultiCameraEncoder needs at least one image key")
        self.image_keys = list(image_keys)
        # ModuleDict keys may not contain "/" or ".": index by position, keep the names for errors.
        self.encoders = nn.ModuleList(
            NatureCNN(observation_spec[key][0][0], observation_spec[key][0][1], features) for key in self.image_keys
        )
        self.out_features = features * len(self.image_keys)

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        return torch.cat([enc(observations[key]) for key, enc in zip(self.image_keys, self.encoders, strict=True)], -1)
