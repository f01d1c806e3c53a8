"""gsplat CUDA backend: the split pipeline of ``gsplat.rasterization`` with the reference's settings.

Settings follow the reference env (nerfstudio splatfacto eval): classic rasterize mode (no antialiasing
compensation), non-packed intermediates, near 0.01 / far 1e10, eps2d 0.3, 16-pixel tiles. gsplat's kernels are
imported inside the methods so that importing this module on a CPU machine costs nothing.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gsrl.splat.backends import Projection


class GsplatBackend:
    """Calls ``gsplat.cuda._wrapper`` kernels; inputs must be CUDA tensors."""

    name = "gsplat"

    def __init__(self, tile_size: int = 16) -> None:
        self.tile_size = tile_size

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
        """``fully_fused_projection`` (non-packed); opacities give the tighter, opacity-aware radii."""
        from gsplat.cuda._wrapper import fully_fused_projection

        radii, means2d, depths, conics, _ = fully_fused_projection(
            means.contiguous(),
            None,
            quats.contiguous(),
            scales.contiguous(),
            viewmats.contiguous(),
            Ks.contiguous(),
            width,
            height,
            eps2d=eps2d,
            near_plane=near,
            far_plane=far,
            radius_clip=0.0,
            packed=False,
            calc_compensations=False,
            opacities=opacities.contiguous(),
        )
        opacities_v = opacities[..., None, :].expand(depths.shape)
        return means2d, conics, depths, radii, opacities_v

    def spherical_harmonics(self, degree: int, directions: Tensor, coeffs: Tensor, masks: Tensor) -> Tensor:
        """gsplat's SH kernel (it needs coefficients materialized per view) plus the +0.5 / clamp of
        ``rasterization``."""
        from gsplat.cuda._wrapper import spherical_harmonics

        coeffs = coeffs.expand(*directions.shape[:-1], *coeffs.shape[-2:])
        return spherical_harmonics(degree, directions, coeffs, masks=masks).add(0.5).clamp_min(0.0)

    def rasterize(self, projection: Projection, width: int, height: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``isect_tiles`` -> ``isect_offset_encode`` -> ``rasterize_to_pixels`` over all [*B, C] images at once."""
        from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles, rasterize_to_pixels

        p = projection
        image_dims = p.depths.shape[:-1]
        n_images = math.prod(image_dims)
        tile_width = math.ceil(width / self.tile_size)
        tile_height = math.ceil(height / self.tile_size)
        tiles_per_gauss, isect_ids, flatten_ids = isect_tiles(
            p.means2d, p.radii, p.depths, self.tile_size, tile_width, tile_height, packed=False, n_images=n_images
        )
        isect_offsets = isect_offset_encode(isect_ids, n_images, tile_width, tile_height)
        isect_offsets = isect_offsets.reshape(image_dims + (tile_height, tile_width))
        colors, alphas = rasterize_to_pixels(
            p.means2d,
            p.conics,
            p.colors.contiguous(),
            p.opacities.contiguous(),
            width,
            height,
            self.tile_size,
            isect_offsets,
            flatten_ids,
            packed=False,
        )
        info = {
            "tile_width": tile_width,
            "tile_height": tile_height,
            "tiles_per_gauss": tiles_per_gauss,
            "isect_ids": isect_ids,
            "flatten_ids": flatten_ids,
            "isect_offsets": isect_offsets,
            "n_isects": int(flatten_ids.numel()),
        }
        return colors, alphas, info
