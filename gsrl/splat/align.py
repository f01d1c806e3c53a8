"""Real2Sim alignment: the similarity transform (scale, rotation, translation) from a splat scene's frame to the sim's.

A scan fitted from real captures (COLMAP / nerfstudio) lives in an arbitrary frame at an arbitrary scale; the sim
(and the policy's camera calibration) uses the robot-base world frame in metres. ``Similarity`` maps splat
coordinates x to sim coordinates ``s R x + t``. It is estimated from

- point pairs (``umeyama``): a handful of clicked correspondences, e.g. table corners and the robot base, which
  also fix the scale;
- ICP (``icp``): refining such a guess by matching the opacity-filtered splat means (``splat_points``) to points
  sampled on the sim's meshes (``sample_scene_surface_points``), with trimmed outliers because a scan holds
  things the sim does not (walls, cables, the operator).

``apply_similarity`` then moves a ``GaussianSet`` into the sim frame, including its view-dependent colour: SH
coefficients of degree >= 1 are rotated so that the colour seen along direction d before is the colour seen along
R d after (the reference's ``transform_shs`` returns its input unchanged, fact sheet 2.2, so its scans keep
colours that face the wrong way). Transforms are saved as JSON (``save_similarity`` / ``load_similarity``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from gsrl.splat.gaussians import GaussianSet
from gsrl.splat.sh import sh_bases
from gsrl.splat.transforms import quat_multiply, rotmat_to_quat


@dataclass(frozen=True)
class Similarity:
    """x -> scale * rotation @ x + translation. rotation [3, 3] proper (det +1), translation [3], scale > 0."""

    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        rotation = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        translation = np.asarray(self.translation, dtype=np.float64).reshape(3)
        if not self.scale > 0:
            raise ValueError(f"similarity scale must be > 0, got {self.scale}")
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-5) or np.linalg.det(rotation) < 0:
            raise ValueError(f"similarity rotation must be a proper rotation matrix, got {rotation.tolist()}")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "translation", translation)

    @property
    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix [[s R, t], [0, 1]]."""
        out = np.eye(4)
        out[:3, :3] = self.scale * self.rotation
        out[:3, 3] = self.translation
        return out

    @staticmethod
    def from_matrix(matrix: np.ndarray) -> Similarity:
        """Inverse of ``matrix``: the scale is the cube root of det(top-left 3x3)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        linear = matrix[:3, :3]
        scale = float(np.cbrt(np.linalg.det(linear)))
        return Similarity(scale, linear / scale, matrix[:3, 3])

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points [..., 3]."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def inverse(self) -> Similarity:
        rotation_t = self.rotation.T
        return Similarity(1.0 / self.scale, rotation_t, -(rotation_t @ self.translation) / self.scale)

    def __matmul__(self, other: Similarity) -> Similarity:
        """Composition: ``(a @ b).apply(x) == a.apply(b.apply(x))``."""
        return Similarity(
            self.scale * other.scale,
            self.rotation @ other.rotation,
            self.scale * self.rotation @ other.translation + self.translation,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "rotation": self.rotation.tolist(),
            "translation": self.translation.tolist(),
            "matrix": self.matrix.tolist(),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Similarity:
        if "scale" in data and "rotation" in data:
            return Similarity(float(data["scale"]), np.asarray(data["rotation"]), np.asarray(data["translation"]))
        return Similarity.from_matrix(np.asarray(data["matrix"]))


def save_similarity(path: str | os.PathLike, transform: Similarity, **metadata: Any) -> None:
    """Write ``transform`` as JSON (scale, rotation, translation and the 4x4 matrix) plus any ``metadata``
    (e.g. ``rms=...``, ``method="icp"``, ``source="scan.ply"``), so the file says where it came from."""
    data = {"convention": "x_sim = scale * rotation @ x_splat + translation"} | transform.to_dict() | metadata
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def load_similarity(path: str | os.PathLike) -> Similarity:
    """Read a transform written by ``save_similarity`` (or any JSON with a 4x4 ``matrix``)."""
    with open(path) as f:
        return Similarity.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------------- estimation


def umeyama(
    source: np.ndarray, target: np.ndarray, with_scale: bool = True, weights: np.ndarray | None = None
) -> Similarity:
    """Least-squares similarity with target ≈ s R source + t (Umeyama 1991), from paired points [N, 3].

    Needs N >= 3 non-collinear pairs. ``with_scale=False`` fixes s = 1 (a rigid fit, for metric scans).
    ``weights`` [N] >= 0 weight each pair's squared residual.
    """
    src = np.asarray(source, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(target, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape or len(src) < 3:
        raise ValueError(f"umeyama needs two [N, 3] arrays with N >= 3, got {src.shape} and {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_src, mu_dst = w @ src, w @ dst
    src_c, dst_c = src - mu_src, dst - mu_dst
    covariance = (dst_c * w[:, None]).T @ src_c  # [3, 3], sum_i w_i dst_i src_i^T
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal matrix is a reflection; take the rotation
        sign[2] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = 1.0
    if with_scale:
        variance = float(w @ (src_c**2).sum(1))
        if variance <= 0:
            raise ValueError("umeyama with scale needs source points that are not all equal")
        scale = float((singular * sign).sum() / variance)
    return Similarity(scale, rotation, mu_dst - scale * rotation @ mu_src)


def rms_residual(source: np.ndarray, target: np.ndarray, transform: Similarity) -> float:
    """Root mean square distance (target units) between transform(source) and target, paired points [N, 3]."""
    diff = transform.apply(source) - np.asarray(target, dtype=np.float64)
    return float(np.sqrt((diff**2).sum(-1).mean()))


@dataclass
class IcpResult:
    """Outcome of ``icp``. ``rms`` is over the inliers of the last iteration (target units); ``rms_all`` over
    every source point; ``history`` holds the inlier RMS per iteration."""

    transform: Similarity
    rms: float
    rms_all: float
    num_inliers: int
    iterations: int
    converged: bool
    history: list[float]


def icp(
    source: np.ndarray,
    target: np.ndarray,
    init: Similarity | None = None,
    *,
    with_scale: bool = False,
    max_iterations: int = 100,
    inlier_fraction: float = 0.9,
    max_distance: float | None = None,
    tolerance: float = 1e-7,
) -> IcpResult:
    """Point-to-point ICP: the similarity that moves ``source`` [N, 3] onto the surface sampled by ``target`` [M, 3].

    Each iteration pairs every transformed source point with its nearest target point (cKDTree), keeps the
    ``inlier_fraction`` closest pairs (trimmed ICP, robust to scan clutter the sim lacks) and, if given, only
    pairs closer than ``max_distance``, then refits with ``umeyama`` on the original source points. It stops when
    the inlier RMS improves by less than ``tolerance`` (relative). ICP only converges to the nearest local
    optimum: start it from a guess within a few degrees and centimetres (``umeyama`` on a few clicked pairs gives
    one). On plane-dominated scenes (a table top) point-to-point ICP slides slowly along the plane, and trimming
    drops the edge pairs that stop the sliding first: from a 6 degree / 7 cm start on the table it needs hundreds
    of iterations, from a clicked-pairs guess ~50. ``with_scale=True`` also refines the scale; keep the inlier
    fraction high then, because shrinking the source onto a dense patch is a degenerate way to lower RMS.
    """
    src = np.asarray(source, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(target, dtype=np.float64).reshape(-1, 3)
    if len(src) < 3 or len(dst) < 3:
        raise ValueError(f"icp needs at least 3 source and 3 target points, got {len(src)} and {len(dst)}")
    if not 0 < inlier_fraction <= 1:
        raise ValueError(f"inlier_fraction must be in (0, 1], got {inlier_fraction}")
    tree = cKDTree(dst)
    transform = init if init is not None else Similarity()
    num_keep = max(3, int(math.ceil(inlier_fraction * len(src))))
    history: list[float] = []
    converged = False
    iteration = 0
    inliers = np.arange(len(src))
    for iteration in range(1, max_iterations + 1):
        distances, nearest = tree.query(transform.apply(src))
        inliers = np.argsort(distances)[:num_keep]
        if max_distance is not None:
            inliers = inliers[distances[inliers] <= max_distance]
            if len(inliers) < 3:
                raise RuntimeError(
                    f"icp: fewer than 3 pairs within max_distance={max_distance} at iteration {iteration}; "
                    "the initial guess is too far off or max_distance too small"
                )
        history.append(float(np.sqrt((distances[inliers] ** 2).mean())))
        transform = umeyama(src[inliers], dst[nearest[inliers]], with_scale=with_scale)
        if len(history) > 1 and history[-2] - history[-1] <= tolerance * max(history[-2], 1e-12):
            converged = True
            break
    distances, _ = tree.query(transform.apply(src))
    kept = np.sort(distances)[:num_keep]
    if max_distance is not None:
        kept = kept[kept <= max_distance]
    return IcpResult(
        transform=transform,
        rms=float(np.sqrt((kept**2).mean())) if len(kept) else float("inf"),
        rms_all=float(np.sqrt((distances**2).mean())),
        num_inliers=len(kept),
        iterations=iteration,
        converged=converged,
        history=history,
    )


def splat_points(
    gaussians: GaussianSet, min_opacity: float = 0.5, max_points: int | None = 50_000, seed: int = 0
) -> np.ndarray:
    """Means [M, 3] (float64) of the Gaussians opaque enough to lie on a surface, for ICP.

    Faint Gaussians are mostly floaters and background haze; dropping them keeps ICP from matching them to the
    table. A random subset of at most ``max_points`` keeps the KD-tree queries fast on multi-million scans.
    """
    keep = (gaussians.opacities >= min_opacity).cpu().numpy()
    points = gaussians.means.detach().cpu().double().numpy()[keep]
    if max_points is not None and len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    return points


def sample_scene_surface_points(
    scene: Any,
    num_points: int = 20_000,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> np.ndarray:
    """Points [num_points, 3] (world frame, metres) sampled uniformly by area on the visual meshes of a sim scene.

    ``scene`` is a ``sapien.Scene`` or a ManiSkill scene / env (its first sub-scene is used, at its current
    state). Entities are picked by name substring: ``include`` (all if None) minus ``exclude``; e.g.
    ``include=["table"]`` for the static table alone. Infinite planes (the ground) have no area and are skipped.
    """
    import sapien
    import trimesh
    from mani_skill.utils.geometry.trimesh_utils import get_render_body_meshes

    scene = getattr(scene, "unwrapped", scene)
    scene = getattr(scene, "scene", scene)
    sub_scene = scene.sub_scenes[0] if hasattr(scene, "sub_scenes") else scene
    meshes = []
    for entity in sub_scene.entities:
        name = entity.name
        if include is not None and not any(key in name for key in include):
            continue
        if any(key in name for key in exclude):
            continue
        body = entity.find_component_by_type(sapien.render.RenderBodyComponent)
        if body is None or not body.is_enabled:
            continue
        world = entity.pose.to_transformation_matrix()
        for mesh in get_render_body_meshes(body):
            mesh.apply_transform(world)
            meshes.append(mesh)
    if not meshes:
        raise ValueError(f"no visual meshes in the scene match include={include} exclude={list(exclude)}")
    merged = trimesh.util.concatenate(meshes)
    points, _ = trimesh.sample.sample_surface(merged, num_points, seed=seed)
    return np.asarray(points, dtype=np.float64)


def align_splat_to_scene(
    gaussians: GaussianSet,
    scene: Any,
    init: Similarity | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    min_opacity: float = 0.5,
    num_scene_points: int = 50_000,
    with_scale: bool = False,
    **icp_options: Any,
) -> IcpResult:
    """ICP of a splat's opaque means (``splat_points``) onto a sim scene's surface (``sample_scene_surface_points``
    with ``include`` / ``exclude``). The result's ``transform`` maps splat coordinates into the sim frame: pass it
    to ``apply_similarity`` and ``save_similarity``; ``rms`` is the inlier residual in metres."""
    source = splat_points(gaussians, min_opacity=min_opacity)
    if len(source) < 3:
        raise ValueError(f"fewer than 3 Gaussians have opacity >= {min_opacity}; lower min_opacity")
    target = sample_scene_surface_points(scene, num_scene_points, include=include, exclude=exclude)
    return icp(source, target, init=init, with_scale=with_scale, **icp_options)


# ---------------------------------------------------------------------------------------------------- Gaussians


@functools.lru_cache(maxsize=1)
def _fibonacci_directions(count: int = 64) -> Tensor:
    """``count`` well-spread unit vectors [count, 3] (float64): a Fibonacci sphere, fixed so results repeat."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    polar = torch.arccos(1 - 2 * i / count)
    azimuth = math.pi * (1 + 5**0.5) * i
    return torch.stack(
        [torch.sin(polar) * torch.cos(azimuth), torch.sin(polar) * torch.sin(azimuth), torch.cos(polar)], -1
    )


def sh_rotation_matrices(rotation: np.ndarray | Tensor, degree: int) -> list[Tensor]:
    """Per band l = 1..degree, the [2l+1, 2l+1] matrix D_l (float64) with Y_l(R d) = D_l Y_l(d) for all d.

    Computed by least squares on 64 fixed directions: Y_l(R d) lies exactly in the span of band l, so the fit is
    exact to rounding (residual ~1e-15), simpler to get right than Wigner-D recursions, and costs microseconds.
    """
    rot = torch.as_tensor(np.asarray(rotation), dtype=torch.float64)
    dirs = _fibonacci_directions()
    basis = sh_bases(degree, dirs)  # [M, K]
    basis_rotated = sh_bases(degree, dirs @ rot.T)
    matrices = []
    for band in range(1, degree + 1):
        cols = slice(band**2, (band + 1) ** 2)
        # basis[:, cols] @ D^T = basis_rotated[:, cols]
        d_transpose = torch.linalg.lstsq(basis[:, cols], basis_rotated[:, cols]).solution
        matrices.append(d_transpose.T)
    return matrices


def rotate_sh(sh: Tensor, rotation: np.ndarray | Tensor) -> Tensor:
    """SH coefficients [N, K, 3] of Gaussians rotated by ``rotation`` [3, 3]: the colour seen along d before is
    the colour seen along R d after. Band 0 (the DC colour) is unchanged; band l maps c -> D_l c."""
    degree = int(round(math.sqrt(sh.shape[1]))) - 1
    if degree == 0:
        return sh.clone()
    out = sh.clone()
    for band, d in enumerate(sh_rotation_matrices(rotation, degree), start=1):
        cols = slice(band**2, (band + 1) ** 2)
        out[:, cols] = torch.einsum("ij,njc->nic", d.to(sh), sh[:, cols])
    return out


def apply_similarity(
    gaussians: GaussianSet, scale: float | Similarity, rotation: np.ndarray | None = None, translation: Any = None
) -> GaussianSet:
    """Move Gaussians by x -> s R x + t: means moved, orientations rotated (q -> q_R ⊗ q), log scales + log s,
    SH of degree >= 1 rotated (``rotate_sh``); opacities unchanged. Accepts a ``Similarity`` as the only argument.

    The covariance becomes s^2 R Σ R^T, exactly what transforming the density gives, so the moved splat seen from
    the equally moved camera renders as the original did.
    """
    transform = scale if isinstance(scale, Similarity) else Similarity(scale, rotation, translation)
    ref = gaussians.means
    rot = torch.as_tensor(transform.rotation, dtype=ref.dtype, device=ref.device)
    trans = torch.as_tensor(transform.translation, dtype=ref.dtype, device=ref.device)
    q_rot = rotmat_to_quat(torch.as_tensor(transform.rotation)).to(gaussians.quats)
    return GaussianSet(
        means=transform.scale * gaussians.means @ rot.T + trans,
        quats=quat_multiply(q_rot.expand_as(gaussians.quats), gaussians.quats),
        log_scales=gaussians.log_scales + math.log(transform.scale),
        opacity_logits=gaussians.opacity_logits.clone(),
        sh=rotate_sh(gaussians.sh, transform.rotation),
    )
