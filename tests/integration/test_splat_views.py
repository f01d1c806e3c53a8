"""Posed views of the task's table rendered by SAPIEN (CPU, lavapipe), saved as a nerfstudio folder and read back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import gsrl.tasks  # noqa: F401  (registers the task)
from gsrl.splat.align import (
    Similarity,
    align_splat_to_scene,
    apply_similarity,
    sample_scene_surface_points,
    umeyama,
)
from gsrl.splat.camera import PinholeCamera, intrinsics, opencv_from_sapien_pose
from gsrl.splat.fit import gaussians_from_points, points_from_depth
from gsrl.splat.views import (
    ViewDataset,
    hemisphere_cameras,
    load_dataset,
    render_sapien_views,
    sapien_pose_from_opencv,
    save_dataset,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
TABLE_TARGET = (-0.135, 0.0, -0.46)  # centre of the table's bounding box (top at z = 0)


@pytest.fixture(scope="module")
def env() -> Iterator[gym.Env]:
    env = gym.make("PutCubeOnPlate-v0", obs_mode="none", sim_backend="physx_cpu")
    env.reset(seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def cameras() -> list[PinholeCamera]:
    return hemisphere_cameras(TABLE_TARGET, 2.2, 6, 64, 64, fov_y_deg=55, min_elevation_deg=20, max_elevation_deg=70)


@pytest.fixture(scope="module")
def table_views(env: gym.Env, cameras: list[PinholeCamera]) -> ViewDataset:
    return render_sapien_views(env, cameras, static_only=True, hide=("ground",), depth=True)


def test_views_show_the_table_with_depth(table_views: ViewDataset) -> None:
    assert table_views.images.shape == (6, 64, 64, 3) and table_views.images.dtype == np.uint8
    assert table_views.background is not None
    background = np.round(np.asarray(table_views.background) * 255)
    table_pixels = np.abs(table_views.images.astype(float) - background).max(-1) > 10
    # Every view sees the table (a wooden top on a grey background), and only the table has depth.
    assert (table_pixels.mean(axis=(1, 2)) > 0.05).all()
    hit = table_views.depths > 0
    assert (table_pixels <= hit).mean() > 0.99
    assert table_views.depths[hit].min() > 0.5 and table_views.depths[hit].max() < 4.0  # 2.2 m from a 2.4 m table
    assert len({img.tobytes() for img in table_views.images}) == 6


def test_depth_and_poses_agree_with_the_sim_geometry(env: gym.Env, table_views: ViewDataset) -> None:
    """Back-projected depth pixels of every view land on the table's mesh: the camera and depth conventions match
    SAPIEN's. The same points, as a splat moved into a "scan frame", are aligned back onto the sim's table."""
    points, colors = points_from_depth(table_views, max_points=20_000)
    # The table top is the plane z = 0. Pixel centres at (j + 0.5, i + 0.5) put its points on it to ~1e-6 m; a
    # half-pixel convention error would tilt each ray by ~1 cm at this range.
    top = points[points[:, 2] > -0.015, 2]
    assert len(top) > 1000 and np.percentile(np.abs(top), 90) < 1e-3
    table = sample_scene_surface_points(env, 40_000, include=["table"])
    lo, hi = table.min(0) - 0.01, table.max(0) + 0.01
    assert ((points >= lo) & (points <= hi)).all()

    splat = gaussians_from_points(points, colors, sh_degree=1, init_opacity=0.9)
    to_scan = Similarity(1.0, Rotation.from_euler("xyz", [3, -2, 6], degrees=True).as_matrix(), [0.05, -0.04, 0.03])
    scan = apply_similarity(splat, to_scan)
    # The documented workflow: a rough guess from four "clicked" pairs (5 mm click noise), refined by ICP.
    rng = np.random.default_rng(0)
    clicked = scan.means[torch.as_tensor(rng.choice(len(scan), 4, replace=False))].double().numpy()
    guess = umeyama(clicked, to_scan.inverse().apply(clicked) + rng.normal(0, 0.005, (4, 3)), with_scale=False)
    result = align_splat_to_scene(scan, env, guess, include=["table"], inlier_fraction=0.95)
    assert result.converged and result.rms < 0.01  # metres: the spacing of the surface samples
    for transform, max_deg, max_m in ((guess, 3.0, 0.03), (result.transform, 0.3, 0.003)):
        error = transform @ to_scan  # the identity if the alignment were exact
        assert np.degrees(np.linalg.norm(Rotation.from_matrix(error.rotation).as_rotvec())) < max_deg
        assert np.linalg.norm(error.translation) < max_m


def test_static_only_hides_robot_and_objects(env: gym.Env) -> None:
    camera = hemisphere_cameras((-0.3, 0.1, 0.1), 1.0, 1, 64, 64, min_elevation_deg=40, max_elevation_deg=40)
    full = render_sapien_views(env, camera).images[0]
    static = render_sapien_views(env, camera, static_only=True).images[0]
    changed = np.abs(full.astype(int) - static).max(-1) > 30
    assert changed.mean() > 0.02  # the arm and objects are gone
    again = render_sapien_views(env, camera).images[0]
    np.testing.assert_array_equal(again, full)  # and shown again afterwards


def test_folder_round_trip(table_views: ViewDataset, tmp_path: Path) -> None:
    path = save_dataset(table_views, tmp_path / "views")
    meta = json.loads(path.read_text())
    assert {"fl_x", "fl_y", "cx", "cy", "w", "h", "frames"} <= meta.keys()
    assert meta["w"] == 64 and len(meta["frames"]) == 6
    back = load_dataset(tmp_path / "views")
    np.testing.assert_array_equal(back.images, table_views.images)
    np.testing.assert_allclose(back.depths, table_views.depths, atol=0.0006)  # millimetre PNG
    assert back.background == pytest.approx(table_views.background)
    for camera, loaded, frame in zip(table_views.cameras, back.cameras, meta["frames"], strict=True):
        torch.testing.assert_close(loaded.K, camera.K)
        torch.testing.assert_close(loaded.world_to_camera, camera.world_to_camera, atol=1e-5, rtol=0)
        # nerfstudio's OpenGL convention: camera looks along -z of transform_matrix, y up.
        c2w = np.asarray(frame["transform_matrix"])
        to_target = np.asarray(TABLE_TARGET) - c2w[:3, 3]
        assert c2w[:3, 2] @ to_target < -0.99 * np.linalg.norm(to_target)
        assert c2w[2, 1] > 0  # image up has a positive world-z component for a camera above the table


def test_sapien_pose_conversion_round_trips(cameras: list[PinholeCamera]) -> None:
    for camera in cameras:
        pose = torch.as_tensor(sapien_pose_from_opencv(camera.world_to_camera).to_transformation_matrix())
        torch.testing.assert_close(opencv_from_sapien_pose(pose).float(), camera.world_to_camera, atol=1e-5, rtol=0)


def test_load_blender_style_folder_with_rgba_and_downscale(tmp_path: Path) -> None:
    """instant-ngp / Blender synthetic layout: camera_angle_x, extension-less paths, RGBA images."""
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)  # BGR on disk
    rgba[:, :30, 3] = 255  # left half opaque, right half transparent
    cv2.imwrite(str(tmp_path / "r_0.png"), rgba)
    c2w = np.eye(4)
    c2w[:3, 3] = [0.0, 0.0, 4.0]  # OpenGL: looking down -z at the origin
    meta = {"camera_angle_x": 2 * np.arctan(0.5), "frames": [{"file_path": "./r_0", "transform_matrix": c2w.tolist()}]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    loaded = load_dataset(tmp_path, downscale=2)
    assert loaded.images.shape == (1, 20, 30, 3)
    assert (loaded.images[0, :, :14] == (50, 100, 200)).all() and (loaded.images[0, :, 16:] == 0).all()
    camera = loaded.cameras[0]
    # fx = 0.5 w / tan(angle / 2) = 60 px at full size -> 30 px; principal point at the centre.
    torch.testing.assert_close(camera.K, intrinsics(30.0, 30.0, 15.0, 10.0))
    torch.testing.assert_close(camera.position, torch.tensor([0.0, 0.0, 4.0]))
    torch.testing.assert_close(camera.project(torch.zeros(3)), torch.tensor([15.0, 10.0]))
