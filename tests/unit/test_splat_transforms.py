"""Quaternion helpers and per-part placement of Gaussians, checked against plain matrix arithmetic."""

from __future__ import annotations

import math

import torch

from gsrl.splat.transforms import (
    PartFrames,
    axis_angle_to_rotmat,
    place_parts,
    quat_multiply,
    quat_to_rotmat,
    rotmat_to_quat,
)


def random_quats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_poses(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    poses = torch.eye(4, dtype=torch.float64).repeat(*shape, 1, 1)
    poses[..., :3, :3] = quat_to_rotmat(torch.randn(*shape, 4, generator=g, dtype=torch.float64))
    poses[..., :3, 3] = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    return poses


def test_quat_to_rotmat_is_a_rotation_and_ignores_scale() -> None:
    q = random_quats(64)
    r = quat_to_rotmat(q)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(64, 3, 3))
    torch.testing.assert_close(torch.det(r), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(quat_to_rotmat(3.7 * q), r)
    # 90 degrees about z maps x to y.
    quarter = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    torch.testing.assert_close(
        quat_to_rotmat(quarter) @ torch.tensor([1.0, 0, 0]).double(), torch.tensor([0, 1.0, 0]).double()
    )


def test_hamilton_product_composes_rotations() -> None:
    a, b = random_quats(32, 1), random_quats(32, 2)
    torch.testing.assert_close(quat_to_rotmat(quat_multiply(a, b)), quat_to_rotmat(a) @ quat_to_rotmat(b))


def test_rotmat_quat_round_trip_including_half_turns() -> None:
    q = torch.nn.functional.normalize(random_quats(200, 3), dim=-1)
    half_turns = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.6, 0.8, 0], [1e-9, 0, 0.6, 0.8]])
    q = torch.cat([q, torch.nn.functional.normalize(half_turns.double(), dim=-1)])
    back = rotmat_to_quat(quat_to_rotmat(q))
    assert (back[:, 0] >= 0).all()
    torch.testing.assert_close(back, torch.where(q[:, :1] < 0, -q, q), atol=1e-7, rtol=0)
    torch.testing.assert_close(quat_to_rotmat(back), quat_to_rotmat(q))


def test_axis_angle_matches_quaternion_and_small_angles() -> None:
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), dim=0)
    angle = 1.1
    q = torch.cat([torch.tensor([math.cos(angle / 2)]).double(), axis * math.sin(angle / 2)])
    torch.testing.assert_close(axis_angle_to_rotmat(axis * angle), quat_to_rotmat(q))
    torch.testing.assert_close(axis_angle_to_rotmat(torch.zeros(3, dtype=torch.float64)), torch.eye(3).double())
    tiny = axis * 1e-8
    skew = torch.tensor([[0, -tiny[2], tiny[1]], [tiny[2], 0, -tiny[0]], [-tiny[1], tiny[0], 0]])
    torch.testing.assert_close(axis_angle_to_rotmat(tiny), torch.eye(3).double() + skew)


def test_place_parts_equals_direct_matrix_math() -> None:
    n, parts, envs = 50, 4, 3
    g = torch.Generator().manual_seed(5)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64)
    quats = random_quats(n, 6) * 2.5  # unnormalized on purpose: the scale must survive
    part_index = torch.randint(0, parts, (n,), generator=g)
    poses = random_poses((envs, parts), 7)
    world_means, world_quats = place_parts(means, quats, part_index, poses)
    assert world_means.shape == (envs, n, 3) and world_quats.shape == (envs, n, 4)
    for e in range(envs):
        for i in range(n):
            pose = poses[e, part_index[i]]
            expected = pose[:3, :3] @ means[i] + pose[:3, 3]
            torch.testing.assert_close(world_means[e, i], expected)
            torch.testing.assert_close(quat_to_rotmat(world_quats[e, i]), pose[:3, :3] @ quat_to_rotmat(quats[i]))
    torch.testing.assert_close(world_quats.norm(dim=-1), quats.norm(dim=-1).expand(envs, n))


def test_identity_poses_leave_gaussians_in_place() -> None:
    means, quats = torch.randn(10, 3).double(), torch.nn.functional.normalize(random_quats(10), dim=-1)
    quats = torch.where(quats[:, :1] < 0, -quats, quats)
    world_means, world_quats = place_parts(
        means, quats, torch.zeros(10, dtype=torch.long), torch.eye(4)[None, None].double()
    )
    torch.testing.assert_close(world_means[0], means)
    torch.testing.assert_close(world_quats[0], quats)


def test_part_frames_rotate_view_directions_into_the_local_frame() -> None:
    poses = random_poses((2, 3), 8)
    part_index = torch.tensor([0, 2, 1, 2])
    frames = PartFrames.from_poses(part_index, poses)
    directions = torch.randn(2, 5, 4, 3, dtype=torch.float64)  # [E, C, N, 3]
    local = frames.to_local(directions)
    for e in range(2):
        for c in range(5):
            for i in range(4):
                rotation = poses[e, part_index[i], :3, :3]
                torch.testing.assert_close(local[e, c, i], rotation.T @ directions[e, c, i])
