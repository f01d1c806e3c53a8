"""Real spherical harmonics up to degree 3 in pure PyTorch, with the constants and sign convention of gsplat's CUDA
kernel (Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013), so both backends give the same colours.

Colour of a Gaussian seen along unit direction d (from the camera centre to the Gaussian, in the frame the
coefficients live in) is max(0, sum_k Y_k(d) c_k + 0.5); for degree 0 that is SH_C0 * c_0 + 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

_C0 = 0.2820947917738781
_C1 = 0.48860251190292


def sh_bases(degree: int, directions: Tensor) -> Tensor:
    """SH basis values [..., (degree+1)^2] at directions [..., 3] (normalized here; any non-zero length)."""
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    ones = torch.full(directions.shape[:-1], _C0, dtype=directions.dtype, device=directions.device)
    if degree == 0:
        return ones[..., None]
    x, y, z = torch.nn.functional.normalize(directions, dim=-1).unbind(-1)
    bases = [ones, -_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        z2 = z * z
        tmp_b = -1.092548430592079 * z
        c1, s1 = x * x - y * y, 2.0 * x * y
        bases += [
            0.5462742152960395 * s1,
            tmp_b * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            tmp_b * x,
            0.5462742152960395 * c1,
        ]
        if degree >= 3:
            tmp_c = -2.285228997322329 * z2 + 0.4570457994644658
            tmp_b3 = 1.445305721320277 * z
            c2, s2 = x * c1 - y * s1, x * s1 + y * c1
            bases += [
                -0.5900435899266435 * s2,
                tmp_b3 * s1,
                tmp_c * y,
                z * (1.865881662950577 * z2 - 1.119528997770346),
                tmp_c * x,
                tmp_b3 * c1,
                -0.5900435899266435 * c2,
            ]
    return torch.stack(bases, dim=-1)


def sh_to_rgb(degree: int, directions: Tensor, coeffs: Tensor) -> Tensor:
    """Colours [..., 3] = max(0, SH(directions) . coeffs + 0.5), as gsplat's ``rasterization`` does.

    ``directions`` [..., 3]; ``coeffs`` [..., K, 3] with K >= (degree+1)^2 (higher bands ignored), broadcastable
    against the direction batch (e.g. [E, 1, N, K, 3] against [E, C, N, 3] directions), which avoids copying the
    coefficients once per camera.
    """
    k = (degree + 1) ** 2
    if coeffs.shape[-2] < k:
        raise ValueError(f"SH degree {degree} needs {k} coefficients per channel, got {coeffs.shape[-2]}")
    bases = sh_bases(degree, directions)  # [..., k]
    rgb = (bases[..., None, :] @ coeffs[..., :k, :])[..., 0, :]
    return torch.clamp_min(rgb + 0.5, 0.0)
