"""Teleports of an ``EnvBatch`` env's cube, for tests that need a success (or its loss) at a chosen step."""

from __future__ import annotations

import torch
from mani_skill.utils.structs.pose import Pose

from services.env_server.core import EnvBatch


def _place_cube(batch: EnvBatch, env_index: int, position: torch.Tensor) -> None:
    task = batch._envs[env_index].unwrapped
    task.cube.set_pose(Pose.create_from_pq(position, task.plate.pose.q))
    task.cube.set_linear_velocity(torch.zeros(1, 3))
    task.cube.set_angular_velocity(torch.zeros(1, 3))


def put_cube_on_plate(batch: EnvBatch, env_index: int) -> None:
    """Env ``env_index``'s cube at rest on its plate, so its next step is a success."""
    task = batch._envs[env_index].unwrapped
    plate = task.plate.pose
    cube_z = plate.p[:, 2:] + task.plate_half_size[2] + task.cube_half_size
    _place_cube(batch, env_index, torch.cat([plate.p[:, :2], cube_z], dim=1))


def move_cube_off_plate(batch: EnvBatch, env_index: int) -> None:
    """Env ``env_index``'s cube on the table 20 cm beside its plate: no longer a success."""
    task = batch._envs[env_index].unwrapped
    beside = task.plate.pose.p.clone()
    beside[:, 0] += 0.2
    beside[:, 2] = task.cube_half_size
    _place_cube(batch, env_index, beside)
