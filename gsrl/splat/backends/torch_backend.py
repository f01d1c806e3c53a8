"""Pure-PyTorch backend: EWA projection and tile-based front-to-back compositing, on CPU (or any device).

It reproduces gsplat 1.5.3's classic mode numerically (same Jacobian clamping, eps2d blur, opacity-aware 3.33-sigma
radii, alpha = min(0.999, o * exp(-sigma)), skip alpha < 1/255, stop a pixel before transmittance would drop to
<= 1e-4) and is differentiable end to end with autograd, so it doubles as a CPU fallback for fitting scenes.
The compositing itself lives in ``torch_raster``; this module is the projection and the glue.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gsrl.splat.backends import Projection
from gsrl.splat.backends.torch_raster import composite_tiles
from gsrl.splat.sh import sh_to_rgb
from gsrl.splat.transforms import quat_to_rotmat

ALPHA_THRESHOLD = 1.0 / 255.0
"""Smallest alpha a Gaussian contributes with (gsplat's ALPHA_THRESHOLD)."""

MAX_EXTENT_SIGMAS = 3.33
"""Bounding-box half-size in standard deviations before the opacity-aware tightening (gsplat's value)."""


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA splatting projection of 3D Gaussians into C pinhole cameras, batched over leading dims [*B].

    Args:
        means [*B, N, 3], quats [*B, N, 4] (w, x, y, z), scales [*B, N, 3] (metres, activated), opacities [*B, N];
        viewmats [*B, C, 4, 4] OpenCV world->camera; Ks [*B, C, 3, 3]; image size in pixels.

    Returns:
        means2d [*B, C, N, 2] pixels; conics [*B, C, N, 3] (inverse 2D covariance a, b, c); depths [*B, C, N] metres;
        radii [*B, C, N, 2] int32, 0 = culled; opacities [*B, C, N].

    The 2D covariance is J W Sigma W^T J^T with Sigma = (R S)(R S)^T, computed as (J W R S)(J W R S)^T so it is
    PSD by construction; eps2d is added to its diagonal (gsplat's "classic" low-pass blur, >= ~1.6 px footprint).
    """
    rot_cam = viewmats[..., :3, :3]  # [*B, C, 3, 3]
    t_cam = viewmats[..., :3, 3]  # [*B, C, 3]
    means_c = torch.einsum("...cij,...nj->...cni", rot_cam, means) + t_cam[..., :, None, :]  # [*B, C, N, 3]
    x, y, z = means_c.unbind(-1)
    depth_ok = (z >= near) & (z <= far)
    z = torch.where(depth_ok, z, torch.ones_like(z))  # keep culled entries finite so their zero grads stay zero

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [*B, C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    # Clamp the point used in the Jacobian to 1.3x the field of view, as gsplat does, so Gaussians far off-screen
    # do not get huge footprints from the 1/z^2 terms.
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    rz = 1.0 / z
    tx = torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)  # tx/z of gsplat
    ty = torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)

    # M = W R S: columns are the Gaussian's scaled principal axes in camera coordinates. [*B, C, N, 3(row), 3]
    axes = quat_to_rotmat(quats) * scales[..., None, :]  # [*B, N, 3, 3]
    m = torch.einsum("...cij,...njk->...cnik", rot_cam, axes)
    # Rows of J: [fx/z, 0, -fx tx/z] and [0, fy/z, -fy ty/z]; J M row by row.
    ja = (fx * rz)[..., None] * (m[..., 0, :] - tx[..., None] * m[..., 2, :])  # [*B, C, N, 3]
    jb = (fy * rz)[..., None] * (m[..., 1, :] - ty[..., None] * m[..., 2, :])
    cov_xx = (ja * ja).sum(-1) + eps2d
    cov_xy = (ja * jb).sum(-1)
    cov_yy = (jb * jb).sum(-1) + eps2d
    det = cov_xx * cov_yy - cov_xy * cov_xy
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([cov_yy / det_safe, -cov_xy / det_safe, cov_xx / det_safe], dim=-1)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    opacities_v = opacities[..., None, :].expand(z.shape)

    with torch.no_grad():
        # Opacity-aware extent (gsplat, arXiv 2402.00525 B.2): beyond sqrt(2 ln(o / (1/255))) sigma alpha < 1/255.
        opac = opacities_v.detach()
        visible_opacity = opac >= ALPHA_THRESHOLD
        extent = torch.sqrt(2.0 * torch.log(torch.clamp_min(opac / ALPHA_THRESHOLD, 1.0)))
        extent = torch.clamp_max(extent, MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * torch.sqrt(cov_xx.detach()))
        radius_y = torch.ceil(extent * torch.sqrt(cov_yy.detach()))
        u, v = means2d.detach().unbind(-1)
        on_image = (u + radius_x > 0) & (u - radius_x < width) & (v + radius_y > 0) & (v - radius_y < height)
        keep = depth_ok & (det > 0) & visible_opacity & on_image & ((radius_x > 0) | (radius_y > 0))
        radii = torch.stack([radius_x, radius_y], dim=-1) * keep[..., None]
        radii = radii.to(torch.int32)
    return means2d, conics, means_c[..., 2], radii, opacities_v


class TorchBackend:
    """CPU/any-device rasterizer.

    ``tile_size`` only affects speed (the image matches gsplat's 16-pixel tiles to within the 1/255 alpha cut-off at
    bounding-box edges); ``chunk_elements`` bounds the [tiles x pixels x Gaussians] block composited per step
    (float32 elements; about eight such blocks are alive at once, plus autograd's saved ones when differentiating);
    ``max_visible`` bounds how many visible (image, Gaussian) pairs are binned and sorted in one pass, so large
    batches are rendered a few images at a time instead of allocating the intersection lists of all of them.
    """

    name = "torch"

    def __init__(
        self,
        tile_size: int = 8,
        chunk_elements: int = 1 << 20,
        min_chunk: int = 16,
        max_chunk: int = 256,
        max_visible: int = 1 << 21,
    ) -> None:
        if tile_size <= 0 or min_chunk <= 0 or max_chunk < min_chunk or max_visible <= 0:
            raise ValueError("TorchBackend: tile_size, min_chunk, max_visible > 0 and max_chunk >= min_chunk required")
        self.tile_size = tile_size
        self.chunk_elements = chunk_elements
        self.min_chunk = min_chunk
        self.max_chunk = max_chunk
        self.max_visible = max_visible

    def project(
        self,
        means: Tensor,
        quats: Tensor,
        scales: Tensor,
        opacities: Tensor,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
        *,
        near: float,
        far: float,
        eps2d: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)

    def spherical_harmonics(self, degree: int, directions: Tensor, coeffs: Tensor, masks: Tensor) -> Tensor:
        """Dense evaluation (culled entries are computed too; cheaper on CPU than gathering them out and back)."""
        return sh_to_rgb(degree, directions, coeffs)

    def rasterize(self, projection: Projection, width: int, height: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        p = projection
        image_dims = p.depths.shape[:-1]
        n_images, n = math.prod(image_dims), p.depths.shape[-1]
        channels = p.colors.shape[-1]
        flat = (
            p.means2d.reshape(n_images, n, 2),
            p.conics.reshape(n_images, n, 3),
            p.colors.reshape(n_images, n, channels),
            p.opacities.reshape(n_images, n),
            p.depths.reshape(n_images, n),
            p.radii.reshape(n_images, n, 2),
        )
        colors, alphas = [], []
        stats = {"n_visible": 0, "n_isects": 0, "chunk_steps": 0}
        for lo, hi in self._image_groups(flat[-1]):
            group_colors, group_alphas, group_stats = composite_tiles(
                *(t[lo:hi] for t in flat),
                width,
                height,
                tile_size=self.tile_size,
                chunk_elements=self.chunk_elements,
                min_chunk=self.min_chunk,
                max_chunk=self.max_chunk,
            )
            colors.append(group_colors)
            alphas.append(group_alphas)
            stats = {k: v + group_stats[k] for k, v in stats.items()}
        info = {"tile_width": math.ceil(width / self.tile_size), "tile_height": math.ceil(height / self.tile_size)}
        return (
            torch.cat(colors).reshape(image_dims + (height, width, channels)),
            torch.cat(alphas).reshape(image_dims + (height, width, 1)),
            {**info, **stats},
        )

    def _image_groups(self, radii: Tensor) -> list[tuple[int, int]]:
        """Consecutive image ranges [lo, hi) with at most ``max_visible`` visible Gaussians each (at least one
        image per range)."""
        visible = (radii > 0).all(dim=-1).sum(dim=-1).tolist()
        groups, lo, total = [], 0, 0
        for i, count in enumerate(visible):
            if i > lo and total + count > self.max_visible:
                groups.append((lo, i))
                lo, total = i, 0
            total += count
        groups.append((lo, len(visible)))
        return groups
