"""Turn a coloured triangle mesh into flat, opaque Gaussians lying on its surface (a "surfel" splat).

This is how a simulated scene gets a splat without a scan: each Gaussian is a thin disc centred on a surface
sample, so rasterizing the set reproduces the mesh's silhouette and albedo from any viewpoint.

Sampling is area-weighted and stratified: a target density (samples per m^2) sets the count, clipped to a per-mesh
minimum and maximum; faces get their share of samples by systematic sampling of the cumulative area, and samples
inside a face follow a randomly shifted R2 low-discrepancy sequence mapped onto the triangle with Heitz's
low-distortion map, so the samples cover the surface evenly and discs of about the sample spacing close it. It is
deterministic given the seed.

Colour space: every colour here is *display-encoded* (sRGB, 0..1), the space of the 8-bit images SAPIEN renders
(SAPIEN shades in linear light and writes sRGB). A texel is ``texel / 255`` for an sRGB texture. When several colour
sources apply they multiply in linear light, as glTF and SAPIEN's shader do: base colour x (vertex or face colour)
x texel, then the product is re-encoded. The Gaussian's colour is this albedo, i.e. what SAPIEN shows under unit
ambient light and no other lights; lighting is not baked in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gsrl.splat.gaussians import GaussianSet, rgb_to_sh_dc

TextureFilter = Literal["nearest", "bilinear"]
TextureWrap = Literal["repeat", "clamp", "mirror"]

_PLASTIC = 1.32471795724474602596  # the R2 sequence's generalized golden ratio
_R2_STEP = np.array([1.0 / _PLASTIC, 1.0 / _PLASTIC**2])


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (IEC 61966-2-1), elementwise."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] -> sRGB encoding, elementwise (inverse of ``srgb_to_linear``)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


@dataclass
class TriangleMesh:
    """A triangle mesh with its colour sources, in metres, in whatever frame the Gaussians should be in.

    Shapes: vertices [V,3]; faces [F,3] vertex indices; vertex_colors [V,3] or face_colors [F,3] sRGB in [0,1];
    uv [V,2] texture coordinates with (0, 0) the top-left corner of ``texture`` (glTF / SAPIEN convention: v grows
    down the image rows); texture [H,W] or [H,W,C] uint8 (C = 1, 2, 3 or 4; alpha is ignored), sRGB-encoded
    unless ``texture_srgb`` is False (then its values are linear); base_color (3,) sRGB in [0,1].
    """

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray | None = None
    face_colors: np.ndarray | None = None
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    texture_srgb: bool = True
    texture_wrap: TextureWrap = "repeat"
    base_color: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, dtype=np.float64)
        self.faces = np.asarray(self.faces, dtype=np.int64)
        v, f = len(self.vertices), len(self.faces)
        checks = {"vertices": (self.vertices, (v, 3)), "faces": (self.faces, (f, 3))}
        checks |= {"vertex_colors": (self.vertex_colors, (v, 3)), "face_colors": (self.face_colors, (f, 3))}
        checks |= {"uv": (self.uv, (v, 2))}
        for name, (array, shape) in checks.items():
            if array is not None and np.shape(array) != shape:
                raise ValueError(f"TriangleMesh.{name} has shape {np.shape(array)}, expected {shape}")
        if f and (self.faces.min() < 0 or self.faces.max() >= v):
            raise ValueError(f"TriangleMesh.faces index outside 0..{v - 1}")
        if self.texture is not None:
            if self.uv is None:
                raise ValueError("TriangleMesh.texture needs uv coordinates")
            if self.texture.dtype != np.uint8 or self.texture.ndim not in (2, 3):
                raise ValueError(f"TriangleMesh.texture must be uint8 [H,W(,C)], got {self.texture.dtype}")
        if self.texture_wrap not in ("repeat", "clamp", "mirror"):
            raise ValueError(f"TriangleMesh.texture_wrap must be repeat, clamp or mirror, got {self.texture_wrap!r}")

    def face_areas(self) -> np.ndarray:
        """Area of each face in m^2, [F]."""
        a, b, c = (self.vertices[self.faces[:, i]] for i in range(3))
        return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


@dataclass(frozen=True)
class SurfaceSampling:
    """How densely and how the surface is covered.

    Attributes:
        density: target samples per m^2 of surface (one Gaussian each).
        min_count, max_count: bounds on the samples of one mesh, so small parts stay visible and large ones cheap.
        disc_scale: in-surface standard deviation as a multiple of the sample spacing sqrt(area / count); about
            0.8 makes neighbouring discs overlap enough that the surface renders closed (accumulated opacity
            above ~0.93 everywhere inside a face; at 0.7 about 4% of the surface falls below 0.95).
        thickness: standard deviation along the face normal, in m (a disc, not a ball).
        opacity: opacity of every Gaussian, in (0, 1).
        texture_filter: how a texel is read at a sample's uv.
        texture_prefilter: average the texture over each sample's footprint (a mip level) before reading it, so a
            fine pattern seen through coarse samples becomes its mean colour instead of aliasing.
    """

    density: float = 20_000.0
    min_count: int = 64
    max_count: int = 20_000
    disc_scale: float = 0.8
    thickness: float = 1e-4
    opacity: float = 0.99
    texture_filter: TextureFilter = "bilinear"
    texture_prefilter: bool = True

    def __post_init__(self) -> None:
        if not (self.density > 0 and self.disc_scale > 0 and self.thickness > 0):
            raise ValueError("SurfaceSampling density, disc_scale and thickness must be positive")
        if not 0 <= self.min_count <= self.max_count:
            raise ValueError(f"SurfaceSampling needs 0 <= min_count <= max_count: {self.min_count}, {self.max_count}")
        if not 0 < self.opacity < 1:
            raise ValueError(f"SurfaceSampling.opacity must be in (0, 1), got {self.opacity}")
        if self.texture_filter not in ("nearest", "bilinear"):
            raise ValueError(f"SurfaceSampling.texture_filter must be nearest or bilinear, got {self.texture_filter!r}")

    def count_for_area(self, area: float) -> int:
        """Number of samples for a surface of ``area`` m^2: density x area, clipped to [min_count, max_count]."""
        if area <= 0:
            return 0
        return int(np.clip(round(area * self.density), self.min_count, self.max_count))


def sample_surface(mesh: TriangleMesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified area-weighted surface samples: face index [count] (sorted) and barycentric weights [count,3]."""
    areas = mesh.face_areas()
    total = areas.sum()
    if count == 0 or total <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    cumulative = np.cumsum(areas) / total
    positions = (np.arange(count) + rng.random()) / count
    face = np.minimum(np.searchsorted(cumulative, positions, side="right"), len(areas) - 1)
    rank = np.arange(count) - np.searchsorted(face, face, side="left")  # index of the sample within its face
    shift = rng.random((len(areas), 2))
    u, v = np.mod(shift[face] + rank[:, None] * _R2_STEP, 1.0).T
    # Heitz 2019, "A Low-Distortion Map Between Triangle and Square": keeps the square's point spacing.
    lower = v > u
    b0 = np.where(lower, u / 2, u - v / 2)
    b1 = np.where(lower, v - u / 2, v / 2)
    return face, np.stack([b0, b1, 1.0 - b0 - b1], axis=1)


def normals_to_quats(normals: np.ndarray) -> np.ndarray:
    """Unit normals [N,3] -> wxyz unit quaternions [N,4] of the shortest rotation taking +z onto each normal."""
    n = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)  # a zero normal gives identity
    # Half-way quaternion (1 + z.n, z x n), normalized; undefined for n = -z, where a half turn about x is used.
    quats = np.stack([1.0 + n[:, 2], -n[:, 1], n[:, 0], np.zeros(len(n))], axis=1)
    flipped = quats[:, 0] < 1e-9
    quats[flipped] = [0.0, 1.0, 0.0, 0.0]
    return quats / np.linalg.norm(quats, axis=1, keepdims=True)


def _wrap(coord: np.ndarray, size: int, mode: TextureWrap) -> np.ndarray:
    """Integer texel indices wrapped into 0..size-1."""
    if mode == "repeat":
        return np.mod(coord, size)
    if mode == "mirror":
        period = np.mod(coord, 2 * size)
        return np.where(period < size, period, 2 * size - 1 - period)
    return np.clip(coord, 0, size - 1)


def _texture_levels(texture: np.ndarray, srgb: bool) -> list[np.ndarray]:
    """Linear-light float32 RGB mip pyramid [H,W,3], [H/2,W/2,3], ... by 2x2 averaging (in linear light)."""
    image = texture if texture.ndim == 3 else texture[:, :, None]
    image = image[:, :, :3] if image.shape[2] >= 3 else np.repeat(image[:, :, :1], 3, axis=2)
    decode = np.arange(256) / 255.0
    decode = (srgb_to_linear(decode) if srgb else decode).astype(np.float32)  # a lookup table: textures are large
    levels = [decode[image]]
    while min(levels[-1].shape[:2]) >= 2:
        top = levels[-1]
        h, w = top.shape[0] // 2 * 2, top.shape[1] // 2 * 2
        levels.append(top[:h:2, :w:2] / 4 + top[1:h:2, :w:2] / 4 + top[:h:2, 1:w:2] / 4 + top[1:h:2, 1:w:2] / 4)
    return levels


def _read_texture(image: np.ndarray, uv: np.ndarray, filter: TextureFilter, wrap: TextureWrap) -> np.ndarray:
    """Texels [N,3] of ``image`` [H,W,3] at ``uv`` [N,2]; texel (i, j) covers uv [j/W, (j+1)/W) x [i/H, (i+1)/H)."""
    h, w = image.shape[:2]
    x, y = uv[:, 0] * w, uv[:, 1] * h
    if filter == "nearest":
        return image[_wrap(np.floor(y).astype(np.int64), h, wrap), _wrap(np.floor(x).astype(np.int64), w, wrap)]
    x0, y0 = np.floor(x - 0.5), np.floor(y - 0.5)
    fx, fy = (x - 0.5 - x0)[:, None], (y - 0.5 - y0)[:, None]
    xs = [_wrap(x0.astype(np.int64) + d, w, wrap) for d in (0, 1)]
    ys = [_wrap(y0.astype(np.int64) + d, h, wrap) for d in (0, 1)]
    top = image[ys[0], xs[0]] * (1 - fx) + image[ys[0], xs[1]] * fx
    bottom = image[ys[1], xs[0]] * (1 - fx) + image[ys[1], xs[1]] * fx
    return top * (1 - fy) + bottom * fy


def _texture_colors(
    mesh: TriangleMesh, face: np.ndarray, bary: np.ndarray, spacing: float, sampling: SurfaceSampling
) -> np.ndarray:
    """Linear-light texel colour [N,3] at each sample, read from the mip level matching the sample footprint."""
    uv = np.einsum("nk,nkd->nd", bary, mesh.uv[mesh.faces[face]])
    levels = _texture_levels(mesh.texture, mesh.texture_srgb)
    level = np.zeros(len(face), dtype=np.int64)
    if sampling.texture_prefilter:
        h, w = mesh.texture.shape[:2]
        tri_uv = mesh.uv[mesh.faces] * [w, h]  # [F,3,2] in texels
        d1, d2 = tri_uv[:, 1] - tri_uv[:, 0], tri_uv[:, 2] - tri_uv[:, 0]
        texel_area = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            texels_per_metre = np.sqrt(texel_area / mesh.face_areas())
        footprint = np.nan_to_num(texels_per_metre[face] * spacing, nan=1.0)  # texels between samples
        level = np.clip(np.floor(np.log2(np.maximum(footprint, 1.0))), 0, len(levels) - 1).astype(np.int64)
    colors = np.empty((len(face), 3))
    for lod in np.unique(level):
        chosen = level == lod
        colors[chosen] = _read_texture(levels[lod], uv[chosen], sampling.texture_filter, mesh.texture_wrap)
    return colors


def mesh_to_gaussians(
    mesh: TriangleMesh, sampling: SurfaceSampling | None = None, seed: int | np.random.Generator = 0
) -> GaussianSet:
    """Flat Gaussians (SH degree 0, float32) covering ``mesh``'s surface, in the mesh's frame.

    Each Gaussian: mean on the surface; rotation taking local z to the face normal; log scales
    (ln(disc_scale * spacing), same, ln(thickness)) with spacing = sqrt(area / count) in m; opacity logit of
    ``sampling.opacity``; DC colour from the mesh's colour sources (see the module docstring for colour space).
    A mesh without area gives an empty set.
    """
    sampling = sampling or SurfaceSampling()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    area = float(mesh.face_areas().sum())
    count = sampling.count_for_area(area)
    face, bary = sample_surface(mesh, count, rng)
    count = len(face)
    corners = mesh.vertices[mesh.faces[face]]  # [N,3,3]
    means = np.einsum("nk,nkd->nd", bary, corners)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    spacing = math.sqrt(area / count) if count else 0.0

    color = np.tile(srgb_to_linear(np.asarray(mesh.base_color, dtype=np.float64)), (count, 1))
    if mesh.vertex_colors is not None:
        vertex_linear = srgb_to_linear(np.asarray(mesh.vertex_colors, dtype=np.float64))
        color *= np.einsum("nk,nkd->nd", bary, vertex_linear[mesh.faces[face]])
    elif mesh.face_colors is not None:
        color *= srgb_to_linear(np.asarray(mesh.face_colors, dtype=np.float64))[face]
    if mesh.texture is not None and count:
        color *= _texture_colors(mesh, face, bary, spacing, sampling)

    log_scales = np.empty((count, 3))
    log_scales[:, :2] = math.log(sampling.disc_scale * spacing) if count else 0.0
    log_scales[:, 2] = math.log(sampling.thickness)
    opacity_logit = math.log(sampling.opacity / (1 - sampling.opacity))
    rgb = torch.from_numpy(linear_to_srgb(color)).float()
    return GaussianSet(
        means=torch.from_numpy(means).float(),
        quats=torch.from_numpy(normals_to_quats(normals) if count else np.zeros((0, 4))).float(),
        log_scales=torch.from_numpy(log_scales).float(),
        opacity_logits=torch.full((count,), opacity_logit, dtype=torch.float32),
        sh=rgb_to_sh_dc(rgb)[:, None, :],
    )
