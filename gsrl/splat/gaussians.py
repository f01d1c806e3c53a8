"""The one in-memory form of a set of 3D Gaussians that every splat module passes around.

The fields are stored in the *activated-before* parameterization that 3DGS trainers optimize and write to PLY
(log scales, opacity logits, unnormalized quaternions, SH coefficients), so a load-save round trip is exact and
fitting can optimize the tensors directly; ``scales``/``opacities``/``unit_quats`` give the activated values
that rasterizers take.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
"""Zeroth-order real spherical harmonic, Y_0^0; colour = SH_C0 * f_dc + 0.5 for degree 0."""


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for ``degree`` (0..3): (degree + 1)^2."""
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    return (degree + 1) ** 2


def sh_degree_of(num_bases: int) -> int:
    """Inverse of ``num_sh_bases``; raises on a count that is not (d+1)^2 for d in 0..3."""
    for degree in range(4):
        if (degree + 1) ** 2 == num_bases:
            return degree
    raise ValueError(f"{num_bases} SH coefficients per channel is not (d+1)^2 for any degree d in 0..3")


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """Linear RGB in [0, 1] -> the DC coefficient that renders as that colour (inverse of SH_C0 * dc + 0.5)."""
    return (rgb - 0.5) / SH_C0


@dataclass
class GaussianSet:
    """N Gaussians. Shapes: means [N,3], quats [N,4] (w, x, y, z), log_scales [N,3], opacity_logits [N],
    sh [N,K,3] with K = (degree+1)^2 (sh[:, 0] is the DC term)."""

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {
            "means": (n, 3),
            "quats": (n, 4),
            "log_scales": (n, 3),
            "opacity_logits": (n,),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"GaussianSet.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.sh.ndim != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise ValueError(f"GaussianSet.sh has shape {tuple(self.sh.shape)}, expected ({n}, K, 3)")
        sh_degree_of(self.sh.shape[1])

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return sh_degree_of(self.sh.shape[1])

    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def unit_quats(self) -> Tensor:
        return torch.nn.functional.normalize(self.quats, dim=-1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianSet:
        return GaussianSet(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def with_sh_degree(self, degree: int) -> GaussianSet:
        """The same Gaussians with SH truncated or zero-padded to ``degree``."""
        k = num_sh_bases(degree)
        sh = self.sh[:, :k]
        if sh.shape[1] < k:
            pad = sh.new_zeros(len(self), k - sh.shape[1], 3)
            sh = torch.cat([sh, pad], dim=1)
        return GaussianSet(self.means, self.quats, self.log_scales, self.opacity_logits, sh)

    @staticmethod
    def concat(sets: list[GaussianSet]) -> GaussianSet:
        """Concatenate sets; SH is padded to the highest degree among them."""
        if not sets:
            raise ValueError("GaussianSet.concat needs at least one set")
        degree = max(s.sh_degree for s in sets)
        sets = [s.with_sh_degree(degree) for s in sets]
        return GaussianSet(*(torch.cat([getattr(s, f.name) for s in sets]) for f in fields(GaussianSet)))

    def subset(self, index: Tensor) -> GaussianSet:
        return GaussianSet(*(getattr(self, f.name)[index] for f in fields(self)))
