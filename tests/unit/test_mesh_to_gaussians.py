"""Mesh -> flat Gaussians: counts follow area, discs lie on the surface, colours come from the right source."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from gsrl.splat.gaussians import SH_C0, GaussianSet
from gsrl.splat.mesh_to_gaussians import (
    SurfaceSampling,
    TriangleMesh,
    linear_to_srgb,
    mesh_to_gaussians,
    normals_to_quats,
    srgb_to_linear,
)

EXACT_SAMPLING = SurfaceSampling(density=1000, min_count=1, max_count=10**6)


def square(width: float = 1.0, height: float = 1.0, **colors: object) -> TriangleMesh:
    """A width x height rectangle in the z=0 plane, corner at the origin; uv = (x/width, 1 - y/height), so the
    image's top row lies along y = height."""
    vertices = np.array([[0, 0, 0], [width, 0, 0], [width, height, 0], [0, height, 0]], dtype=np.float64)
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], dtype=np.float64)
    return TriangleMesh(vertices, np.array([[0, 1, 2], [0, 2, 3]]), uv=uv, **colors)


def box(half: float = 0.25, face_colors: np.ndarray | None = None) -> TriangleMesh:
    """An axis-aligned cube centred at the origin; faces in the order -x, +x, -y, +y, -z, +z, two triangles each."""
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)])
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    faces = np.array([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    order = np.argsort(np.r_[np.arange(6), np.arange(6)], kind="stable")  # both triangles of a quad together
    faces = faces[order]
    return TriangleMesh(corners, faces, face_colors=None if face_colors is None else np.repeat(face_colors, 2, axis=0))


def rendered_rgb(gaussians: GaussianSet) -> np.ndarray:
    """The colour a degree-0 rasterizer shows, [N,3]."""
    return (SH_C0 * gaussians.sh[:, 0] + 0.5).numpy()


def rotation_matrices(quats: np.ndarray) -> np.ndarray:
    w, x, y, z = (quats / np.linalg.norm(quats, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=1),
        ],
        axis=1,
    )


def test_counts_follow_area_and_bounds() -> None:
    assert len(mesh_to_gaussians(square(), EXACT_SAMPLING)) == 1000
    assert len(mesh_to_gaussians(square(2.0, 1.5), EXACT_SAMPLING)) == 3000
    assert len(mesh_to_gaussians(box(0.25), EXACT_SAMPLING)) == 1500  # 6 faces of 0.25 m^2
    bounded = SurfaceSampling(density=1000, min_count=50, max_count=400)
    assert len(mesh_to_gaussians(square(0.1, 0.1), bounded)) == 50
    assert len(mesh_to_gaussians(square(), bounded)) == 400


def test_samples_split_between_faces_by_area() -> None:
    gaussians = mesh_to_gaussians(box(0.25), EXACT_SAMPLING)
    axis = np.abs(gaussians.means.numpy()).argmax(axis=1)
    sign = np.sign(gaussians.means.numpy()[np.arange(len(axis)), axis])
    per_face = np.array([np.sum((axis == a) & (sign == s)) for a in range(3) for s in (-1, 1)])
    assert np.all(np.abs(per_face - 250) <= 1), per_face


def test_means_on_surface_and_thin_axis_along_normal() -> None:
    half = 0.25
    gaussians = mesh_to_gaussians(box(half), EXACT_SAMPLING, seed=3)
    means = gaussians.means.numpy()
    assert np.all(np.abs(means) <= half + 1e-6)
    on_face = np.abs(np.abs(means) - half) < 1e-6
    assert np.all(on_face.any(axis=1))
    axis = np.abs(means).argmax(axis=1)
    normals = np.zeros_like(means)
    normals[np.arange(len(axis)), axis] = 1.0
    local_z = rotation_matrices(gaussians.quats.numpy())[:, :, 2]
    assert np.allclose(np.abs(np.sum(local_z * normals, axis=1)), 1.0, atol=1e-5)
    scales = gaussians.scales.numpy()
    spacing = math.sqrt(1.5 / 1500)
    assert np.allclose(scales[:, 0], EXACT_SAMPLING.disc_scale * spacing, rtol=1e-5)
    assert np.allclose(scales[:, 1], scales[:, 0])
    assert np.allclose(scales[:, 2], EXACT_SAMPLING.thickness, rtol=1e-5)
    assert np.allclose(gaussians.opacities.numpy(), EXACT_SAMPLING.opacity, atol=1e-6)
    assert gaussians.sh_degree == 0


def test_discs_close_the_surface() -> None:
    """Stratified samples leave no hole much wider than the spacing (i.i.d. ones leave ~1.8x), and with the default
    disc size the accumulated opacity inside the square is near 1 everywhere (i.i.d. samples drop to ~0.1-0.2)."""
    sampling = SurfaceSampling(density=1000, min_count=1, max_count=10**6)
    gaussians = mesh_to_gaussians(square(), sampling, seed=1)
    spacing = math.sqrt(1.0 / len(gaussians))
    probes = np.stack(np.meshgrid(np.linspace(0.05, 0.95, 181), np.linspace(0.05, 0.95, 181)), axis=-1).reshape(-1, 2)
    distance, _ = cKDTree(gaussians.means.numpy()[:, :2]).query(probes, k=30)
    assert distance[:, 0].max() < 1.2 * spacing, distance[:, 0].max() / spacing
    sigma = gaussians.scales[0, 0].item()
    alpha = sampling.opacity * np.exp(-(distance**2) / (2 * sigma**2))
    coverage = 1 - np.prod(1 - alpha, axis=1)
    assert coverage.min() > 0.9, coverage.min()


def test_normals_to_quats_rotate_z_onto_the_normal() -> None:
    rng = np.random.default_rng(0)
    normals = np.concatenate([rng.normal(size=(100, 3)), [[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, 0, -1 + 1e-12]]])
    quats = normals_to_quats(normals)
    assert np.allclose(np.linalg.norm(quats, axis=1), 1.0)
    unit = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    assert np.allclose(rotation_matrices(quats)[:, :, 2], unit, atol=1e-6)


def test_deterministic_under_seed() -> None:
    mesh = box(0.1)
    a, b = mesh_to_gaussians(mesh, seed=7), mesh_to_gaussians(mesh, seed=7)
    c = mesh_to_gaussians(mesh, seed=8)
    assert torch.equal(a.means, b.means) and torch.equal(a.quats, b.quats) and torch.equal(a.sh, b.sh)
    assert not torch.equal(a.means, c.means)


def test_base_color_is_kept_in_display_space() -> None:
    gaussians = mesh_to_gaussians(square(base_color=(0.2, 0.6, 0.9)), EXACT_SAMPLING)
    assert np.allclose(rendered_rgb(gaussians), [0.2, 0.6, 0.9], atol=1e-5)


def test_srgb_round_trip() -> None:
    x = np.linspace(0, 1, 101)
    assert np.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-12)
    assert np.isclose(linear_to_srgb(np.array(0.5)), 0.7353569830524495)


def test_vertex_colors_are_interpolated_in_linear_light() -> None:
    """Left edge (x=0) red, right edge (x=1) blue: a sample's colour is the linear-light blend at its x."""
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    gaussians = mesh_to_gaussians(square(vertex_colors=np.array([red, blue, blue, red])), EXACT_SAMPLING)
    x = gaussians.means.numpy()[:, 0]
    expected = linear_to_srgb(np.stack([1 - x, np.zeros_like(x), x], axis=1))
    assert np.allclose(rendered_rgb(gaussians), expected, atol=1e-5)


def test_face_colors_map_to_their_faces() -> None:
    colors = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float64)
    gaussians = mesh_to_gaussians(box(0.25, face_colors=colors), EXACT_SAMPLING)
    means = gaussians.means.numpy()
    axis = np.abs(means).argmax(axis=1)
    face = 2 * axis + (means[np.arange(len(axis)), axis] > 0)
    assert np.allclose(rendered_rgb(gaussians), colors[face], atol=1e-5)


KNOWN_TEXELS = np.array(
    [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8
)  # row 0 (top): red, green; row 1: blue, white


def test_texture_nearest_reads_the_texel_under_each_sample() -> None:
    sampling = SurfaceSampling(density=1000, min_count=1, max_count=10**6, texture_filter="nearest")
    gaussians = mesh_to_gaussians(square(texture=KNOWN_TEXELS), sampling)
    x, y = gaussians.means.numpy()[:, :2].T
    row, col = np.floor((1 - y) * 2).astype(int).clip(0, 1), np.floor(x * 2).astype(int).clip(0, 1)
    assert np.allclose(rendered_rgb(gaussians), KNOWN_TEXELS[row, col] / 255.0, atol=1e-5)
    assert {tuple(c) for c in np.round(rendered_rgb(gaussians), 3)} == {(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)}


def test_texture_repeats_when_uv_leaves_the_unit_square() -> None:
    sampling = SurfaceSampling(density=1000, min_count=1, max_count=10**6, texture_filter="nearest")
    mesh = square(texture=KNOWN_TEXELS)
    mesh.uv = mesh.uv * 2  # two tiles each way
    gaussians = mesh_to_gaussians(mesh, sampling)
    x, y = gaussians.means.numpy()[:, :2].T
    row, col = (np.floor((1 - y) * 4).astype(int) % 2), (np.floor(x * 4).astype(int) % 2)
    assert np.allclose(rendered_rgb(gaussians), KNOWN_TEXELS[row, col] / 255.0, atol=1e-5)


def test_texture_bilinear_blends_neighbouring_texels_in_linear_light() -> None:
    """A black|white 1x2 texture, clamped: colour ramps linearly (in linear light) between the texel centres."""
    sampling = SurfaceSampling(density=1000, min_count=1, max_count=10**6, texture_prefilter=False)
    texture = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    gaussians = mesh_to_gaussians(square(texture=texture, texture_wrap="clamp"), sampling)
    x = gaussians.means.numpy()[:, 0]
    expected = linear_to_srgb(np.clip(2 * x - 0.5, 0, 1))
    assert np.allclose(rendered_rgb(gaussians), expected[:, None].repeat(3, axis=1), atol=1e-5)


def test_texture_times_base_color_multiply_in_linear_light() -> None:
    sampling = SurfaceSampling(density=200, min_count=1, max_count=10**6, texture_filter="nearest")
    texture = np.full((1, 1, 3), 128, dtype=np.uint8)
    gaussians = mesh_to_gaussians(square(texture=texture, base_color=(0.5, 1.0, 0.0)), sampling)
    lin = srgb_to_linear(np.array(128 / 255.0))
    expected = linear_to_srgb(np.array([srgb_to_linear(np.array(0.5)) * lin, lin, 0.0]))
    assert np.allclose(rendered_rgb(gaussians), expected, atol=1e-5)


def test_texture_prefilter_averages_detail_finer_than_the_samples() -> None:
    """A one-texel checkerboard seen by samples 6 texels apart renders as its mean, not as black/white noise."""
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    coarse = SurfaceSampling(density=100, min_count=1, max_count=10**6, texture_filter="nearest")
    filtered = rendered_rgb(mesh_to_gaussians(square(texture=checker), coarse))
    assert np.allclose(filtered, linear_to_srgb(np.array(0.5)), atol=1e-5)
    raw = rendered_rgb(mesh_to_gaussians(square(texture=checker), replace(coarse, texture_prefilter=False)))
    assert set(np.round(raw[:, 0], 5)) == {0.0, 1.0}


def test_mesh_without_area_gives_an_empty_set() -> None:
    flat = TriangleMesh(np.zeros((3, 3)), np.array([[0, 1, 2]]))
    assert len(mesh_to_gaussians(flat)) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"faces": np.array([[0, 1, 7]])}, "index outside"),
        ({"vertex_colors": np.zeros((2, 3))}, "vertex_colors has shape"),
        ({"texture": np.zeros((2, 2, 3), dtype=np.uint8), "uv": None}, "needs uv"),
        ({"texture": np.zeros((2, 2, 3)), "uv": np.zeros((3, 2))}, "uint8"),
    ],
)
def test_mesh_validation(kwargs: dict, message: str) -> None:
    args = {"vertices": np.eye(3), "faces": np.array([[0, 1, 2]])} | kwargs
    with pytest.raises(ValueError, match=message):
        TriangleMesh(**args)
