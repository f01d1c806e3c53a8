"""Rasterizer backends behind ``SplatRenderer``: the split pipeline both implement, and how one is chosen.

Rendering is split the way gsplat's CUDA pipeline is (``fully_fused_projection`` -> SH colours -> ``isect_tiles`` ->
``rasterize_to_pixels``) so that a static layer's projection can be computed once and concatenated with the moving
Gaussians' projection each step; the depth sort then runs over both together. This module imports neither gsplat
nor any backend, so CPU-only machines never load CUDA kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

BackendName = Literal["auto", "gsplat", "torch"]


@dataclass(frozen=True)
class Projection:
    """Gaussians projected into a batch of images, non-packed: leading dims [*B, C] (env batch, cameras), then N.

    Entries with any ``radii`` == 0 are culled (behind the near plane, off-image, too transparent) and their other
    fields are undefined. ``means2d`` [*B, C, N, 2] pixels, ``conics`` [*B, C, N, 3] upper triangle of the inverse
    2D covariance (a, b, c), ``depths`` [*B, C, N] camera-frame z in metres, ``radii`` [*B, C, N, 2] int32 bounding
    half-extent in pixels, ``opacities`` [*B, C, N], ``colors`` [*B, C, N, D] per-view colours (after SH).
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    opacities: Tensor
    colors: Tensor

    def concat(self, other: Projection) -> Projection:
        """This projection followed by ``other`` along N (same [*B, C] and colour channels)."""
        return Projection(
            *(
                torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=-2 if f.name in _VEC else -1)
                for f in fields(self)
            )
        )

    def select(self, index: Tensor) -> Projection:
        """Only the Gaussians ``index`` [M] (long) along N."""
        return Projection(
            *(getattr(self, f.name).index_select(-2 if f.name in _VEC else -1, index) for f in fields(self))
        )


_VEC = {"means2d", "conics", "radii", "colors"}  # fields with a trailing vector dim after N


class RasterBackend(Protocol):
    """What ``SplatRenderer`` needs from a backend; shapes as in ``Projection``, all batch dims [*B] optional."""

    name: str
    tile_size: int

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
        """EWA-project means [*B, N, 3], quats [*B, N, 4], scales [*B, N, 3], opacities [*B, N] with viewmats
        [*B, C, 4, 4] and Ks [*B, C, 3, 3] -> (means2d, conics, depths, radii, opacities [*B, C, N])."""
        ...

    def spherical_harmonics(self, degree: int, directions: Tensor, coeffs: Tensor, masks: Tensor) -> Tensor:
        """Colours [..., 3] = max(0, SH . coeffs + 0.5) for directions [..., 3], coeffs [..., K, 3] (broadcast)."""
        ...

    def rasterize(self, projection: Projection, width: int, height: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Front-to-back alpha compositing over a zero background -> (colors [*B, C, H, W, D], alphas
        [*B, C, H, W, 1], info)."""
        ...


def make_backend(
    name: BackendName, device: torch.device, tile_size: int | None = None, **torch_options: Any
) -> RasterBackend:
    """Instantiate a backend; "auto" picks gsplat on CUDA and the pure-PyTorch one elsewhere. ``tile_size`` None
    means each backend's default (gsplat 16, torch 8).

    The gsplat module is imported only here, and only when chosen, so CPU machines without compiled kernels never
    try to build or load them.
    """
    if name == "auto":
        name = "gsplat" if device.type == "cuda" else "torch"
    if name == "gsplat":
        if device.type != "cuda":
            raise ValueError(f"the gsplat backend needs a CUDA device, got {device}; use backend='torch'")
        from gsrl.splat.backends.gsplat_backend import GsplatBackend

        return GsplatBackend(tile_size=tile_size or 16)
    if name == "torch":
        from gsrl.splat.backends.torch_backend import TorchBackend

        if tile_size is not None:
            torch_options["tile_size"] = tile_size
        return TorchBackend(**torch_options)
    raise ValueError(f"unknown splat backend {name!r}; expected 'auto', 'gsplat' or 'torch'")
