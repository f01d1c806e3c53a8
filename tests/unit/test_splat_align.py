"""Real2Sim alignment: Umeyama and trimmed ICP recover known transforms; Gaussians move with their colours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci, _spherical_harmonics
from scipy.spatial.transform import Rotation

from gsrl.splat.align import (
    Similarity,
    apply_similarity,
    icp,
    load_similarity,
    rms_residual,
    rotate_sh,
    save_similarity,
    splat_points,
    umeyama,
)
from gsrl.splat.gaussians import GaussianSet

TRUE = Similarity(1.3, Rotation.from_euler("xyz", [20, -35, 70], degrees=True).as_matrix(), np.array([0.4, -1.2, 2.0]))


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.linalg.norm(Rotation.from_matrix(a @ b.T).as_rotvec())))


def random_gaussians(n: int, degree: int, seed: int = 0) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return GaussianSet(
        means=torch.randn(n, 3, generator=g, dtype=torch.float64),
        quats=torch.randn(n, 4, generator=g, dtype=torch.float64) * 2.0,  # unnormalized on purpose
        log_scales=torch.randn(n, 3, generator=g, dtype=torch.float64) - 3.0,
        opacity_logits=torch.randn(n, generator=g, dtype=torch.float64),
        sh=torch.randn(n, k, 3, generator=g, dtype=torch.float64),
    )


def l_shaped_cloud(n: int, seed: int = 0) -> np.ndarray:
    """Points on three boxes of different sizes (no symmetry ICP could confuse), about 1 x 0.6 x 0.4 m."""
    rng = np.random.default_rng(seed)
    boxes = [(np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.2, 0.1])), (np.array([0.0, 0.2, 0.0]), [0.2, 0.4, 0.1])]
    boxes.append((np.array([0.8, 0.0, 0.1]), np.array([0.2, 0.2, 0.3])))
    points = []
    for corner, size in boxes:
        p = rng.uniform(0, 1, (n // 3, 3))
        face = rng.integers(0, 3, n // 3)
        p[np.arange(len(p)), face] = rng.integers(0, 2, len(p))  # push each point onto a face
        points.append(corner + p * np.asarray(size))
    return np.concatenate(points)


def test_umeyama_recovers_similarity_from_noisy_pairs() -> None:
    rng = np.random.default_rng(1)
    source = rng.uniform(-1, 1, (40, 3))
    target = TRUE.apply(source) + rng.normal(0, 0.005, (40, 3))
    estimate = umeyama(source, target, with_scale=True)
    assert abs(estimate.scale - TRUE.scale) < 0.01
    assert rotation_angle_deg(estimate.rotation, TRUE.rotation) < 0.5
    assert np.linalg.norm(estimate.translation - TRUE.translation) < 0.02
    # The least-squares residual is the noise level (3-D std 0.005 * sqrt(3) ~ 0.0087), not more.
    assert rms_residual(source, target, estimate) < 0.01
    assert rms_residual(source, target, estimate) <= rms_residual(source, target, TRUE)


def test_umeyama_rigid_keeps_unit_scale_and_rejects_reflections() -> None:
    rng = np.random.default_rng(2)
    source = rng.uniform(-1, 1, (10, 3))
    rigid = Similarity(1.0, TRUE.rotation, TRUE.translation)
    estimate = umeyama(source, rigid.apply(source), with_scale=False)
    assert estimate.scale == 1.0
    np.testing.assert_allclose(estimate.matrix, rigid.matrix, atol=1e-9)
    # A mirrored target has a reflection as best orthogonal fit; the estimate must still be a proper rotation.
    mirrored = umeyama(source, source * np.array([1.0, 1.0, -1.0]), with_scale=False)
    assert np.linalg.det(mirrored.rotation) == pytest.approx(1.0)


def test_icp_recovers_perturbed_copy_with_outliers() -> None:
    rng = np.random.default_rng(3)
    sim_points = l_shaped_cloud(6000, seed=3)
    # The "scan": a subset of the surface in its own frame, noisy, plus 10% clutter the sim does not have.
    offset = Similarity(1.0, Rotation.from_euler("xyz", [4, -3, 8], degrees=True).as_matrix(), [0.04, -0.03, 0.02])
    scan = offset.inverse().apply(sim_points[rng.choice(len(sim_points), 2000, replace=False)])
    scan += rng.normal(0, 0.002, scan.shape)
    clutter = rng.uniform([-0.5, -0.5, -0.5], [1.5, 1.0, 1.0], (200, 3))
    source = np.concatenate([scan, clutter])
    result = icp(source, sim_points, init=Similarity(), inlier_fraction=0.85)
    assert result.converged
    assert rotation_angle_deg(result.transform.rotation, offset.rotation) < 0.5
    assert np.linalg.norm(result.transform.translation - offset.translation) < 0.005
    assert result.rms < 0.006  # noise plus the sampling gap of the target surface
    assert result.history[0] > 5 * result.rms


def test_icp_refines_scale_from_a_umeyama_guess() -> None:
    rng = np.random.default_rng(4)
    sim_points = l_shaped_cloud(6000, seed=4)
    true = Similarity(2.5, Rotation.from_euler("z", 30, degrees=True).as_matrix(), [0.1, 0.2, 0.0])
    scan = true.inverse().apply(sim_points[rng.choice(len(sim_points), 1500, replace=False)])
    # A rough guess from three clicked pairs, each click 1 cm off in the sim.
    pair_idx = rng.choice(len(scan), 4, replace=False)
    guess = umeyama(scan[pair_idx], true.apply(scan[pair_idx]) + rng.normal(0, 0.01, (4, 3)))
    result = icp(scan, sim_points, init=guess, with_scale=True, inlier_fraction=0.95)
    assert abs(result.transform.scale - true.scale) < 0.01 * true.scale
    assert rotation_angle_deg(result.transform.rotation, true.rotation) < 0.5
    assert result.rms < 0.005


def test_similarity_algebra_and_json_round_trip(tmp_path: Path) -> None:
    points = np.random.default_rng(5).normal(size=(7, 3))
    other = Similarity(0.5, Rotation.from_euler("y", 40, degrees=True).as_matrix(), [1.0, 0.0, -1.0])
    np.testing.assert_allclose((TRUE @ other).apply(points), TRUE.apply(other.apply(points)), atol=1e-12)
    np.testing.assert_allclose(TRUE.inverse().apply(TRUE.apply(points)), points, atol=1e-12)
    np.testing.assert_allclose(Similarity.from_matrix(TRUE.matrix).matrix, TRUE.matrix, atol=1e-12)
    path = tmp_path / "splat_to_sim.json"
    save_similarity(path, TRUE, rms=0.003, method="icp")
    np.testing.assert_allclose(load_similarity(path).matrix, TRUE.matrix, atol=1e-12)
    with pytest.raises(ValueError, match="proper rotation"):
        Similarity(1.0, np.diag([1.0, 1.0, -1.0]), np.zeros(3))


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_rotated_sh_shows_the_same_colour_along_the_rotated_direction(degree: int) -> None:
    g = torch.Generator().manual_seed(degree)
    sh = torch.randn(50, (degree + 1) ** 2, 3, generator=g, dtype=torch.float64)
    rotation = torch.as_tensor(Rotation.random(random_state=degree).as_matrix())
    directions = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    rotated = rotate_sh(sh, rotation)
    # gsplat's own reference SH evaluation, so the test also pins the basis convention to the rasterizer's.
    before = _spherical_harmonics(degree, directions, sh)
    after = _spherical_harmonics(degree, directions @ rotation.T, rotated)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)
    assert not torch.allclose(_spherical_harmonics(degree, directions, rotated), before, atol=1e-3)
    torch.testing.assert_close(rotated[:, 0], sh[:, 0])  # the DC colour does not depend on direction


def test_apply_similarity_moves_covariances_and_composes() -> None:
    gaussians = random_gaussians(30, degree=3)
    moved = apply_similarity(gaussians, TRUE)
    rot = torch.as_tensor(TRUE.rotation)
    torch.testing.assert_close(moved.means, torch.as_tensor(TRUE.apply(gaussians.means.numpy())))
    cov, _ = _quat_scale_to_covar_preci(gaussians.unit_quats, gaussians.scales, compute_preci=False)
    cov_moved, _ = _quat_scale_to_covar_preci(moved.unit_quats, moved.scales, compute_preci=False)
    torch.testing.assert_close(cov_moved, TRUE.scale**2 * rot @ cov @ rot.T)
    torch.testing.assert_close(moved.quats.norm(dim=-1), gaussians.quats.norm(dim=-1))  # unnormalized scale kept
    torch.testing.assert_close(moved.opacity_logits, gaussians.opacity_logits)

    second = Similarity(0.7, Rotation.from_euler("xz", [-50, 15], degrees=True).as_matrix(), [0.0, 0.3, -0.1])
    twice = apply_similarity(apply_similarity(gaussians, TRUE), second)
    once = apply_similarity(gaussians, second @ TRUE)
    torch.testing.assert_close(twice.means, once.means)
    torch.testing.assert_close(twice.log_scales, once.log_scales)
    torch.testing.assert_close(twice.sh, once.sh)
    # q and -q are one rotation; compare the unit quaternions up to that sign.
    dots = (twice.unit_quats * once.unit_quats).sum(-1).abs()
    torch.testing.assert_close(dots, torch.ones_like(dots))
    assert math.isclose(float(once.log_scales.mean() - gaussians.log_scales.mean()), math.log(0.7 * 1.3))


def test_splat_points_keeps_only_opaque_gaussians() -> None:
    gaussians = random_gaussians(1000, degree=0, seed=6)
    points = splat_points(gaussians, min_opacity=0.5, max_points=None)
    assert len(points) == int((gaussians.opacities >= 0.5).sum())
    assert len(splat_points(gaussians, min_opacity=0.5, max_points=100)) == 100
