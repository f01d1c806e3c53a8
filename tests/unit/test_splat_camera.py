"""Camera conventions: SAPIEN pose -> OpenCV view matrix, resizing by centre crop, look_at and pose noise."""

from __future__ import annotations

import math

import pytest
import torch

from gsrl.splat.camera import (
    PinholeCamera,
    intrinsics,
    look_at,
    opencv_from_sapien_pose,
    perturb_view,
    perturbed,
    resized,
    rigid_inverse,
    stack_cameras,
)
from gsrl.splat.transforms import axis_angle_to_rotmat

# The reference env's calibrated third-person camera (fact sheet section 1.8), as a SAPIEN pose.
REFERENCE_ROTATION = [
    [0.68370109, -0.50239316, 0.52929587],
    [0.33318036, 0.86018832, 0.38609201],
    [-0.64926404, -0.08762054, 0.75549905],
]
REFERENCE_POSITION = [0.075, -0.161, 0.497]


def sapien_pose(rotation: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3], pose[:3, 3] = rotation, position
    return pose


def reference_camera() -> PinholeCamera:
    pose = sapien_pose(torch.tensor(REFERENCE_ROTATION, dtype=torch.float64), torch.tensor(REFERENCE_POSITION))
    K = intrinsics(604.152161, 604.267212, 316.670074, 243.194473, dtype=torch.float64)
    return PinholeCamera(K, 640, 480, opencv_from_sapien_pose(pose))


def random_sapien_pose(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rotation = axis_angle_to_rotmat(torch.randn(3, generator=g, dtype=torch.float64))
    return sapien_pose(rotation, torch.randn(3, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_straight_ahead_of_sapien_camera_projects_to_principal_point(seed: int) -> None:
    pose = random_sapien_pose(seed)
    K = intrinsics(500.0, 480.0, 320.5, 241.0, torch.float64)
    camera = PinholeCamera(K, 640, 480, opencv_from_sapien_pose(pose))
    ahead = pose[:3, 3] + 2.0 * pose[:3, 0]  # SAPIEN x is forward
    torch.testing.assert_close(camera.project(ahead), torch.tensor([320.5, 241.0], dtype=torch.float64))
    in_camera = camera.world_to_camera @ torch.cat([ahead, torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(in_camera[:3], torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))  # OpenCV z forward


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sapien_left_is_image_left_and_sapien_up_is_image_up(seed: int) -> None:
    pose = random_sapien_pose(seed)
    K = intrinsics(500.0, 500.0, 320.0, 240.0, torch.float64)
    camera = PinholeCamera(K, 640, 480, opencv_from_sapien_pose(pose))
    ahead = pose[:3, 3] + 2.0 * pose[:3, 0]
    left = camera.project(ahead + 0.1 * pose[:3, 1])  # SAPIEN +y = left
    up = camera.project(ahead + 0.1 * pose[:3, 2])  # SAPIEN +z = up
    assert left[0] < 320.0 - 20 and left[1] == pytest.approx(240.0)
    assert up[1] < 240.0 - 20 and up[0] == pytest.approx(320.0)


def test_reference_camera_matches_the_fact_sheet() -> None:
    camera = reference_camera()
    expected_rotation = torch.tensor(
        [[0.502393, -0.860188, 0.087621], [-0.529296, -0.386092, -0.755499], [0.683701, 0.33318, -0.649264]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(camera.world_to_camera[:3, :3], expected_rotation, atol=2e-6, rtol=0)
    expected_translation = torch.tensor([-0.219717, 0.353019, 0.325049], dtype=torch.float64)
    torch.testing.assert_close(camera.world_to_camera[:3, 3], expected_translation, atol=2e-6, rtol=0)
    cube, plate = camera.project(torch.tensor([[0.4, 0.2, 0.02], [0.45, 0.0, 0.02]], dtype=torch.float64))
    assert torch.allclose(cube, torch.tensor([142.0, 289.0], dtype=torch.float64), atol=1.0)
    assert torch.allclose(plate, torch.tensor([325.0, 340.0], dtype=torch.float64), atol=1.0)


def test_opencv_from_sapien_pose_is_batched() -> None:
    poses = torch.stack([random_sapien_pose(s) for s in range(4)])
    batched = opencv_from_sapien_pose(poses)
    for i in range(4):
        torch.testing.assert_close(batched[i], opencv_from_sapien_pose(poses[i]))


def test_rigid_inverse_equals_matrix_inverse() -> None:
    pose = random_sapien_pose(7)
    torch.testing.assert_close(rigid_inverse(pose), torch.linalg.inv(pose))


@pytest.mark.parametrize("size", [(224, 224), (128, 128), (320, 120), (100, 200)])
def test_resized_keeps_the_centre_of_view_and_square_pixels(size: tuple[int, int]) -> None:
    camera = reference_camera()
    small = resized(camera, *size)
    assert (small.width, small.height) == size
    # The world point seen at the source image centre is seen at the new image centre.
    centre_ray = torch.linalg.inv(camera.K) @ torch.tensor([320.0, 240.0, 1.0], dtype=torch.float64)
    point = camera.camera_to_world @ torch.cat([centre_ray * 1.3, torch.ones(1, dtype=torch.float64)])
    # (atol: the fact sheet's rotation is orthonormal to ~1e-8 only, so the rigid inverse is not exact.)
    centre = torch.tensor([size[0] / 2, size[1] / 2], dtype=torch.float64)
    torch.testing.assert_close(small.project(point[:3]), centre, atol=1e-4, rtol=0)
    assert small.K[0, 0] / small.K[1, 1] == pytest.approx(float(camera.K[0, 0] / camera.K[1, 1]))
    torch.testing.assert_close(small.world_to_camera, camera.world_to_camera)


def test_resized_to_square_crops_the_sides_of_a_landscape_camera() -> None:
    camera = PinholeCamera(intrinsics(600.0, 600.0, 320.0, 240.0, torch.float64), 640, 480, torch.eye(4).double())
    small = resized(camera, 240, 240)  # keep the central 480x480, halve it
    torch.testing.assert_close(small.K[:2, :3], torch.tensor([[300.0, 0, 120.0], [0, 300.0, 120.0]]).double())
    # The left edge of the crop (source column 80) becomes column 0; the top row stays the top row.
    edge = torch.tensor([(80.0 - 320.0) / 600.0, (0.0 - 240.0) / 600.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(small.project(edge), torch.tensor([0.0, 0.0], dtype=torch.float64))


def test_look_at_centres_the_target_with_up_above() -> None:
    eye, target = torch.tensor([1.0, 0.5, 0.8]), torch.tensor([0.2, -0.1, 0.0])
    camera = PinholeCamera(intrinsics(100.0, 100.0, 64.0, 48.0), 128, 96, look_at(eye, target))
    torch.testing.assert_close(camera.project(target), torch.tensor([64.0, 48.0]), atol=1e-4, rtol=0)
    above = camera.project(target + torch.tensor([0.0, 0.0, 0.1]))
    assert above[1] < 48.0 - 1.0
    torch.testing.assert_close(camera.position, eye)
    rotation = camera.world_to_camera[:3, :3]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.det(rotation) == pytest.approx(1.0, abs=1e-6)


def test_look_at_rejects_up_along_the_view() -> None:
    with pytest.raises(ValueError, match="parallel"):
        look_at(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3))


def test_perturbed_is_reproducible_small_and_rigid() -> None:
    camera = reference_camera()
    a = perturbed(camera, 0.01, math.radians(1.0), torch.Generator().manual_seed(3))
    b = perturbed(camera, 0.01, math.radians(1.0), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.world_to_camera, b.world_to_camera)
    moved = (a.position - camera.position).norm()
    assert 0 < moved < 0.06
    rotation = a.world_to_camera[:3, :3]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64))
    cos = (rotation[2] * camera.world_to_camera[2, :3]).sum()  # forward axes
    assert math.degrees(math.acos(min(1.0, float(cos)))) < 6.0
    same = perturbed(camera, 0.0, 0.0)
    torch.testing.assert_close(same.world_to_camera, camera.world_to_camera)


def test_perturb_view_draws_independent_noise_per_camera() -> None:
    views = reference_camera().world_to_camera.expand(5, 4, 4)
    noisy = perturb_view(views, 0.02, 0.02, torch.Generator().manual_seed(0))
    assert noisy.shape == (5, 4, 4)
    assert len({tuple(v[:3, 3].tolist()) for v in noisy}) == 5


def test_stack_cameras_requires_one_size() -> None:
    camera = reference_camera()
    viewmats, Ks = stack_cameras([camera, camera])
    assert viewmats.shape == (2, 4, 4) and Ks.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="different image sizes"):
        stack_cameras([camera, resized(camera, 128, 128)])
