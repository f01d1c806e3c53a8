"""The one public rendering API: all environments x all cameras in one batched call, on gsplat (CUDA) or PyTorch.

``SplatRenderer.render`` takes world-frame Gaussians batched over environments [E, N, ...] (or unbatched [N, ...],
gsplat's training layout) and cameras [E, C, ...], and returns RGB composited over a background, alpha and expected
depth. A ``StaticLayer`` holds Gaussians that never move (table, floor): their projection and colours are computed
once per camera set and cached; each step they are concatenated with the moving Gaussians *before* the per-tile depth
sort, so a cube behind the table edge is hidden by it (the reference renders the two layers separately and pastes
the foreground on top with no depth test, which is wrong wherever the robot goes below the table top).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from gsrl.splat.backends import BackendName, Projection, RasterBackend, make_backend
from gsrl.splat.camera import rigid_inverse
from gsrl.splat.gaussians import SH_C0, GaussianSet
from gsrl.splat.transforms import PartFrames


@dataclass(frozen=True)
class RenderOutput:
    """``rgb`` [*B, C, H, W, 3] float in [0, 1] over the background; ``alpha`` [*B, C, H, W, 1] accumulated opacity;
    ``depth`` [*B, C, H, W, 1] expected camera-frame z in metres (sum w z / alpha, 0 where alpha = 0), or None when
    not requested; ``info`` the intermediate tensors (gsplat ``meta`` keys, for ``DefaultStrategy``)."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor | None
    info: dict[str, Any]


class StaticLayer:
    """World-frame Gaussians that never move, shared by all environments, with a per-camera-set projection cache.

    Tensors: means [S, 3], quats [S, 4], scales [S, 3] (activated), opacities [S] (activated), colors [S, K, 3] SH
    (``sh_degree`` set) or [S, 3] RGB. SH is evaluated in world frame. The cache holds the projection for the last
    (viewmats, Ks, image size, renderer settings) it saw, compacted to the Gaussians some camera sees; it is
    recomputed automatically when any of those change (e.g. new per-episode camera noise) and never carries
    gradients: fit the static scene with ordinary dynamic rendering instead.
    """

    def __init__(
        self, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, sh_degree: int | None
    ) -> None:
        n = means.shape[0]
        if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3) or opacities.shape != (n,):
            raise ValueError("StaticLayer: expected means [S,3], quats [S,4], scales [S,3], opacities [S]")
        if colors.shape[0] != n or colors.ndim != (3 if sh_degree is not None else 2):
            raise ValueError(f"StaticLayer: colors {tuple(colors.shape)} do not match S={n} and sh_degree={sh_degree}")
        self.means, self.quats, self.scales, self.opacities, self.colors = means, quats, scales, opacities, colors
        self.sh_degree = sh_degree
        self._key: tuple[Any, ...] | None = None
        self._cameras: tuple[Tensor, Tensor] | None = None
        self._projection: Projection | None = None

    @classmethod
    def from_gaussians(cls, gaussians: GaussianSet, sh_degree: int | None = None) -> StaticLayer:
        """From a world-frame ``GaussianSet``; ``sh_degree`` defaults to all the bands it has."""
        degree = gaussians.sh_degree if sh_degree is None else sh_degree
        return cls(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh, degree)

    def __len__(self) -> int:
        return self.means.shape[0]

    def invalidate(self) -> None:
        """Drop the cached projection (e.g. after editing the tensors in place)."""
        self._key, self._cameras, self._projection = None, None, None


class SplatRenderer:
    """Batched 3DGS renderer with one API over two backends.

    Args:
        backend: "gsplat" (CUDA kernels), "torch" (pure PyTorch, any device, differentiable) or "auto" (gsplat when
            ``device`` is CUDA, else torch).
        device: where rendering runs; defaults to CUDA when available.
        background: RGB in [0, 1] composited under everything (per-call ``background`` overrides it).
        near, far: camera-frame z clipping in metres; eps2d: 2D blur added to projected covariances (pixels^2);
            these defaults are gsplat's and the reference env's.
        tile_size: tile edge in pixels (gsplat: 16; torch default 8, faster on CPU, same image).
        torch_options: ``chunk_elements``, ``min_chunk``, ``max_chunk`` for the torch backend's memory bound.
    """

    def __init__(
        self,
        backend: BackendName = "auto",
        device: torch.device | str | None = None,
        background: tuple[float, float, float] = (0.0, 0.0, 0.0),
        near: float = 0.01,
        far: float = 1e10,
        eps2d: float = 0.3,
        tile_size: int | None = None,
        **torch_options: Any,
    ) -> None:
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.backend: RasterBackend = make_backend(backend, self.device, tile_size=tile_size, **torch_options)
        self.background = torch.tensor(background, dtype=torch.float32, device=self.device)
        self.near, self.far, self.eps2d = near, far, eps2d

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def render(
        self,
        means: Tensor,
        quats: Tensor,
        scales: Tensor,
        opacities: Tensor,
        colors: Tensor,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
        sh_degree: int | None = None,
        *,
        static: StaticLayer | None = None,
        sh_frames: PartFrames | None = None,
        background: Tensor | None = None,
        render_depth: bool = True,
    ) -> RenderOutput:
        """Render E environments x C cameras in one call.

        Args:
            means [*B, N, 3] world (B = (E,) or () for a single scene), quats [*B, N, 4] (w, x, y, z),
            scales [*B, N, 3] or [N, 3] (metres, activated), opacities [*B, N] or [N] (in [0, 1]),
            colors: SH [*B, N, K, 3] or [N, K, 3] when ``sh_degree`` is set, else RGB [*B, N, 3] or [N, 3];
            viewmats [*B, C, 4, 4] OpenCV world->camera (or [C, 4, 4], shared by all envs), Ks likewise [.., C, 3, 3].
            static: Gaussians that never move, drawn with correct depth ordering against these (see ``StaticLayer``).
            sh_frames: local SH frames of the moving Gaussians (from ``place_parts``' poses); without it SH is
                evaluated with world-frame view directions.
            background: overrides the constructor's, broadcastable to [*B, C, H, W, 3] (a colour or an image).
            render_depth: also composite depth (one more channel).

        Returns:
            ``RenderOutput`` with images [*B, C, H, W, ...].
        """
        _check_inputs(means, quats, colors, viewmats, Ks, sh_degree)
        dev = self.device
        means, quats = means.to(dev), quats.to(dev)
        batch = means.shape[:-2]
        n = means.shape[-2]
        viewmats = viewmats.to(dev).expand(*batch, *viewmats.shape[-3:])
        Ks = Ks.to(dev).expand(*batch, *Ks.shape[-3:])
        n_cameras = viewmats.shape[-3]
        scales = scales.to(dev).expand(*batch, n, 3)
        opacities = opacities.to(dev).expand(*batch, n)
        colors = colors.to(dev)

        if n > 0:
            projected = self._project(means, quats, scales, opacities, viewmats, Ks, width, height)
            means2d, conics, depths, radii, opac_v = projected
        else:  # only a static layer to draw; CUDA kernels do not take empty launches
            lead = (*batch, n_cameras, 0)
            means2d, conics, depths = means.new_zeros(*lead, 2), means.new_zeros(*lead, 3), means.new_zeros(*lead)
            radii, opac_v = torch.zeros(*lead, 2, dtype=torch.int32, device=dev), means.new_zeros(*lead)
        if means2d.requires_grad:
            means2d.retain_grad()  # DefaultStrategy reads means2d.grad for densification
        colors_v = self._view_colors(means, colors, sh_degree, viewmats, radii, sh_frames)
        projection = Projection(means2d, conics, depths, radii, opac_v, colors_v)
        info: dict[str, Any] = {
            "means2d": means2d,
            "radii": radii,
            "depths": depths,
            "conics": conics,
            "opacities": opac_v,
            "gaussian_ids": None,
            "batch_ids": None,
            "camera_ids": None,
            "width": width,
            "height": height,
            "n_cameras": n_cameras,
            "n_batches": int(torch.Size(batch).numel()),
            "tile_size": self.backend.tile_size,
            "backend": self.backend.name,
        }
        if static is not None:
            static_projection = self.project_static(static, viewmats, Ks, width, height)
            info["n_static"] = static_projection.depths.shape[-1]
            projection = projection.concat(
                replace(static_projection, colors=static_projection.colors.to(colors_v.dtype))
            )
        if render_depth:
            projection = replace(
                projection, colors=torch.cat([projection.colors, projection.depths[..., None]], dim=-1)
            )
        rendered, alpha, raster_info = self.backend.rasterize(projection, width, height)
        info.update(raster_info)

        bg = self.background if background is None else background.to(dev)
        rgb = rendered[..., :3] + (1.0 - alpha) * bg.to(rendered.dtype)
        depth = rendered[..., 3:4] / alpha.clamp_min(1e-10) if render_depth else None
        return RenderOutput(rgb=rgb.clamp(0.0, 1.0), alpha=alpha, depth=depth, info=info)

    def project_static(self, static: StaticLayer, viewmats: Tensor, Ks: Tensor, width: int, height: int) -> Projection:
        """The static layer projected into viewmats [*B, C, 4, 4] / Ks [*B, C, 3, 3], from the cache when the cameras
        and settings match the last call (call it at episode reset to take the cost out of the first step)."""
        viewmats, Ks = viewmats.to(self.device), Ks.to(self.device)
        key = (self.backend.name, self.backend.tile_size, self.device, width, height, self.near, self.far, self.eps2d)
        cached = static._cameras
        if (
            static._projection is not None
            and static._key == key
            and cached is not None
            and cached[0].shape == viewmats.shape
            and torch.equal(cached[0], viewmats)
            and torch.equal(cached[1], Ks)
        ):
            return static._projection
        with torch.no_grad():
            batch = viewmats.shape[:-3]
            s = len(static)
            means = static.means.to(self.device).expand(*batch, s, 3)
            quats = static.quats.to(self.device).expand(*batch, s, 4)
            scales = static.scales.to(self.device).expand(*batch, s, 3)
            opacities = static.opacities.to(self.device).expand(*batch, s)
            means2d, conics, depths, radii, opac_v = self.backend.project(
                means,
                quats,
                scales,
                opacities,
                viewmats,
                Ks,
                width,
                height,
                near=self.near,
                far=self.far,
                eps2d=self.eps2d,
            )
            colors_v = self._view_colors(means, static.colors.to(self.device), static.sh_degree, viewmats, radii, None)
            projection = Projection(means2d, conics, depths, radii, opac_v, colors_v)
            # Keep only Gaussians some camera sees: the table behind every camera costs nothing per step.
            seen = (radii > 0).all(dim=-1).reshape(-1, s).any(dim=0)
            projection = projection.select(seen.nonzero().squeeze(1))
        static._key, static._cameras, static._projection = key, (viewmats.clone(), Ks.clone()), projection
        return projection

    def _project(
        self,
        means: Tensor,
        quats: Tensor,
        scales: Tensor,
        opacities: Tensor,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.backend.project(
            means, quats, scales, opacities, viewmats, Ks, width, height, near=self.near, far=self.far, eps2d=self.eps2d
        )

    def _view_colors(
        self,
        means: Tensor,
        colors: Tensor,
        sh_degree: int | None,
        viewmats: Tensor,
        radii: Tensor,
        sh_frames: PartFrames | None,
    ) -> Tensor:
        """Per-view colours [*B, C, N, D] from RGB [.., N, D] or SH [.., N, K, 3] (``sh_degree`` set)."""
        batch, n, n_cameras = means.shape[:-2], means.shape[-2], viewmats.shape[-3]
        if sh_degree is None:
            rgb = colors.expand(*batch, n, colors.shape[-1])
            return rgb[..., None, :, :].expand(*batch, n_cameras, n, rgb.shape[-1])
        coeffs = colors.expand(*batch, n, *colors.shape[-2:])
        if sh_degree == 0:  # view-independent: no per-camera work, same arithmetic as gsplat's kernel
            rgb = torch.clamp_min(SH_C0 * coeffs[..., 0, :] + 0.5, 0.0)
            return rgb[..., None, :, :].expand(*batch, n_cameras, n, 3)
        camera_centres = rigid_inverse(viewmats)[..., :3, 3]  # [*B, C, 3]
        directions = means[..., None, :, :] - camera_centres[..., :, None, :]  # [*B, C, N, 3]
        if sh_frames is not None:
            directions = sh_frames.to_local(directions)
        masks = (radii > 0).all(dim=-1)
        return self.backend.spherical_harmonics(sh_degree, directions, coeffs[..., None, :, :, :], masks)


def _check_inputs(
    means: Tensor, quats: Tensor, colors: Tensor, viewmats: Tensor, Ks: Tensor, sh_degree: int | None
) -> None:
    """Name the offending argument up front instead of failing inside a kernel."""
    if means.ndim < 2 or means.shape[-1] != 3:
        raise ValueError(f"render: means must be [..., N, 3], got {tuple(means.shape)}")
    if quats.shape != means.shape[:-1] + (4,):
        raise ValueError(f"render: quats must be {tuple(means.shape[:-1]) + (4,)}, got {tuple(quats.shape)}")
    if viewmats.ndim < 3 or viewmats.shape[-2:] != (4, 4) or Ks.shape[-2:] != (3, 3):
        shapes = f"{tuple(viewmats.shape)} and {tuple(Ks.shape)}"
        raise ValueError(f"render: viewmats [..., C, 4, 4] and Ks [..., C, 3, 3] expected, got {shapes}")
    if viewmats.shape[-3] != Ks.shape[-3]:
        raise ValueError(f"render: {viewmats.shape[-3]} view matrices but {Ks.shape[-3]} intrinsics")
    if sh_degree is not None:
        if colors.ndim < 3 or colors.shape[-1] != 3 or colors.shape[-2] < (sh_degree + 1) ** 2:
            needed, got = (sh_degree + 1) ** 2, tuple(colors.shape)
            raise ValueError(f"render: sh_degree={sh_degree} needs SH colors [..., N, >={needed}, 3], got {got}")
    elif colors.ndim < 2 or colors.shape[-2:] != (means.shape[-2], 3):
        raise ValueError(f"render: RGB colors must be [..., N, 3] with N={means.shape[-2]}, got {tuple(colors.shape)}")


def to_uint8(rgb: Tensor) -> Tensor:
    """Float image(s) in [0, 1] -> uint8 with rounding (the reference truncates, which darkens by half a level)."""
    return (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)
