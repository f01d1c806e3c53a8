"""Rigid-body placement of per-part Gaussians, batched over environments.

Each robot link and object is a set of Gaussians in that body's local frame; every step the simulator gives one pose
per body and env. ``place_parts`` moves all of them in one gather: mu' = R_k mu + t_k and q' = quat(R_k) * q (Hamilton
product, quaternions w, x, y, z). Scales and opacities are frame-independent. SH coefficients stay in the local frame:
instead of rotating them (Wigner-D matrices per degree), the renderer rotates the *view direction* into the local
frame with R_k^T (``PartFrames``) and evaluates SH there, which is exact and costs one 3x3 product per Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b of quaternions [..., 4] (w, x, y, z): rotating by b first, then by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Quaternions [..., 4] (w, x, y, z; normalized here, so any non-zero scale is fine) -> rotations [..., 3, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def rotmat_to_quat(rotations: Tensor) -> Tensor:
    """Rotations [..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z) with w >= 0.

    Uses the largest of the four candidate denominators (Shepperd's method) so it stays accurate near 180 degrees,
    where the naive trace formula divides by ~0.
    """
    m = rotations
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4*q_i^2 for i = w, x, y, z; pick the largest per matrix.
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)
    best = sq.argmax(dim=-1, keepdim=True)
    r = torch.sqrt(torch.clamp(sq.gather(-1, best), min=1e-12))  # = 2 |q_best|
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s21, s02, s10 = m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1]
    candidates = torch.stack(
        [
            torch.stack([sq[..., 0], d21, d02, d10], dim=-1),
            torch.stack([d21, sq[..., 1], s10, s02], dim=-1),
            torch.stack([d02, s10, sq[..., 2], s21], dim=-1),
            torch.stack([d10, s02, s21, sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )  # [..., 4 (choice), 4 (w,x,y,z)], each row = 4 q_best * q
    index = best[..., None].expand(*best.shape[:-1], 1, 4)
    quats = candidates.gather(-2, index)[..., 0, :] / (2 * r)
    quats = torch.nn.functional.normalize(quats, dim=-1)
    return torch.where(quats[..., :1] < 0, -quats, quats)


def axis_angle_to_rotmat(rotvec: Tensor) -> Tensor:
    """Axis-angle vectors [..., 3] (direction = axis, norm = angle in radians) -> rotations [..., 3, 3] (Rodrigues)."""
    angle = rotvec.norm(dim=-1, keepdim=True)
    half = 0.5 * angle
    # sin(half)/angle -> 0.5 as angle -> 0; the series keeps small angles exact without a division by ~0.
    small = angle < 1e-6
    scale = torch.where(small, 0.5 - angle * angle / 48.0, torch.sin(half) / torch.where(small, 1.0, angle))
    quats = torch.cat([torch.cos(half), rotvec * scale], dim=-1)
    return quat_to_rotmat(quats)


def place_parts(means: Tensor, quats: Tensor, part_index: Tensor, poses: Tensor) -> tuple[Tensor, Tensor]:
    """Move local-frame Gaussians to world with one pose per part and environment.

    Args:
        means: [N, 3] Gaussian centres in their part's local frame (metres).
        quats: [N, 4] local orientations (w, x, y, z; need not be normalized, the scale is kept).
        part_index: [N] long, which part (0..P-1) each Gaussian belongs to.
        poses: [E, P, 4, 4] world-from-part transforms for E environments.

    Returns:
        (means [E, N, 3], quats [E, N, 4]) in world: mu' = R_k mu + t_k, q' = quat(R_k) * q.
    """
    if means.ndim != 2 or quats.shape != (means.shape[0], 4) or part_index.shape != (means.shape[0],):
        raise ValueError(
            f"place_parts: expected means [N,3], quats [N,4], part_index [N]; got {tuple(means.shape)}, "
            f"{tuple(quats.shape)}, {tuple(part_index.shape)}"
        )
    if poses.ndim != 4 or poses.shape[-2:] != (4, 4):
        raise ValueError(f"place_parts: poses must be [E, P, 4, 4], got {tuple(poses.shape)}")
    rotations = poses[..., :3, :3][:, part_index]  # [E, N, 3, 3]
    translations = poses[..., :3, 3][:, part_index]  # [E, N, 3]
    world_means = (rotations @ means[None, :, :, None])[..., 0] + translations
    part_quats = rotmat_to_quat(poses[..., :3, :3])[:, part_index]  # [E, N, 4]
    world_quats = quat_multiply(part_quats, quats[None].to(part_quats.dtype))
    return world_means, world_quats


@dataclass(frozen=True)
class PartFrames:
    """Local SH frames of placed Gaussians: ``part_index`` [N] long and world-from-part ``rotations`` [E, P, 3, 3].

    Handed to ``SplatRenderer.render(sh_frames=...)`` so view-dependent colour (SH degree > 0) is evaluated with the
    view direction expressed in each part's own frame, where its coefficients were fitted.
    """

    part_index: Tensor
    rotations: Tensor

    @staticmethod
    def from_poses(part_index: Tensor, poses: Tensor) -> PartFrames:
        """From the same [E, P, 4, 4] poses given to ``place_parts``."""
        return PartFrames(part_index, poses[..., :3, :3])

    def to_local(self, directions: Tensor) -> Tensor:
        """World directions [..., C, N, 3] (leading dims = the env batch of ``rotations``) -> local, R_k^T d."""
        rotations = self.rotations[..., self.part_index, :, :]  # [..., N, 3, 3]
        # d_local_i = sum_j R_ji d_j, broadcast over the camera axis.
        return torch.einsum("...nji,...cnj->...cni", rotations, directions)
