"""Pinhole cameras in the OpenCV convention that gsplat rasterizes with, and the conversions the env needs.

Every camera here is stored as gsplat takes it: intrinsics ``K`` in pixels and a world->camera view matrix with
camera axes x right, y down, z forward (OpenCV). ManiSkill/SAPIEN poses cameras with x forward, y left, z up, so
``opencv_from_sapien_pose`` is the one place that convention changes. Pixel coordinates are continuous with pixel
(i, j) covering [j, j+1) x [i, i+1), i.e. its centre at (j + 0.5, i + 0.5), as in gsplat's rasterizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gsrl.splat.transforms import axis_angle_to_rotmat


@dataclass(frozen=True, eq=False)
class PinholeCamera:
    """One calibrated camera. ``K`` [3, 3] (fx, fy, cx, cy in pixels), ``width``/``height`` in pixels,
    ``world_to_camera`` [4, 4] rigid transform into the OpenCV camera frame (x right, y down, z forward)."""

    K: Tensor
    width: int
    height: int
    world_to_camera: Tensor

    def __post_init__(self) -> None:
        if tuple(self.K.shape) != (3, 3):
            raise ValueError(f"PinholeCamera.K has shape {tuple(self.K.shape)}, expected (3, 3)")
        if tuple(self.world_to_camera.shape) != (4, 4):
            raise ValueError(
                f"PinholeCamera.world_to_camera has shape {tuple(self.world_to_camera.shape)}, expected (4, 4)"
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"PinholeCamera size must be positive, got {self.width}x{self.height}")

    @property
    def camera_to_world(self) -> Tensor:
        """[4, 4] inverse of the view matrix (columns: right, down, forward axes and the position, in world)."""
        return rigid_inverse(self.world_to_camera)

    @property
    def position(self) -> Tensor:
        """[3] camera centre in world coordinates (metres)."""
        return self.camera_to_world[:3, 3]

    def project(self, points: Tensor) -> Tensor:
        """World points [..., 3] -> pixel coordinates [..., 2] (no distortion, no visibility test)."""
        rotation, translation = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        cam = points @ rotation.T + translation
        uv = cam[..., :2] / cam[..., 2:3]
        return uv * torch.stack([self.K[0, 0], self.K[1, 1]]) + torch.stack([self.K[0, 2], self.K[1, 2]])


def rigid_inverse(transform: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] as [R^T, -R^T t], exact and cheaper than a general inverse."""
    rotation_t = transform[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(transform)
    out[..., :3, :3] = rotation_t
    out[..., :3, 3] = -(rotation_t @ transform[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def intrinsics(fx: float, fy: float, cx: float, cy: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """K [3, 3] from focal lengths and principal point in pixels."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def opencv_from_sapien_pose(cam_to_world: Tensor) -> Tensor:
    """SAPIEN camera pose(s) [..., 4, 4] (x forward, y left, z up) -> OpenCV world->camera view matrices [..., 4, 4].

    The OpenCV camera axes in world are right = -y_s, down = -z_s, forward = x_s, so the OpenCV camera->world matrix
    is [-y_s, -z_s, x_s | t] and the view matrix is its inverse. This is the net effect of the reference's
    SAPIEN -> nerfstudio (OpenGL) -> ``get_viewmat`` chain, written as one step.
    """
    rotation = cam_to_world[..., :3, :3]
    c2w = cam_to_world.clone()
    c2w[..., :3, 0] = -rotation[..., :, 1]
    c2w[..., :3, 1] = -rotation[..., :, 2]
    c2w[..., :3, 2] = rotation[..., :, 0]
    return rigid_inverse(c2w)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """OpenCV world->camera [4, 4] for a camera at ``eye`` [3] looking at ``target`` [3]; ``up`` [3] (default +z,
    ManiSkill's world up) fixes the roll so that image "up" (-y) points along it. ``up`` must not be parallel to the
    viewing direction."""
    eye, target = torch.as_tensor(eye), torch.as_tensor(target)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype) if up is None else torch.as_tensor(up, dtype=eye.dtype)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up)
    if float(right.norm()) < 1e-8:
        raise ValueError("look_at: up is parallel to the viewing direction")
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=eye.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return rigid_inverse(c2w)


def resized(camera: PinholeCamera, width: int, height: int) -> PinholeCamera:
    """The same camera rendering at ``width`` x ``height``: centre-crop to the new aspect ratio, then scale.

    A 640x480 calibrated camera asked for 224x224 keeps its central 480x480 region, scaled by 224/480; the optical
    centre of view stays at the image centre and pixels stay square (fx/fy ratio kept). The pose is unchanged.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"resized: size must be positive, got {width}x{height}")
    src_w, src_h = camera.width, camera.height
    if src_w * height > width * src_h:  # source is wider: crop columns
        crop_w, crop_h = src_h * width / height, float(src_h)
    else:  # source is taller (or equal): crop rows
        crop_w, crop_h = float(src_w), src_w * height / width
    x0, y0 = (src_w - crop_w) / 2.0, (src_h - crop_h) / 2.0
    scale = width / crop_w
    K = camera.K.clone()
    K[0, 0], K[1, 1] = camera.K[0, 0] * scale, camera.K[1, 1] * scale
    K[0, 1] = camera.K[0, 1] * scale
    K[0, 2], K[1, 2] = (camera.K[0, 2] - x0) * scale, (camera.K[1, 2] - y0) * scale
    return replace(camera, K=K, width=width, height=height)


def perturb_view(
    world_to_camera: Tensor,
    translation_std: float,
    rotation_std_rad: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random camera pose noise for domain randomization, batched over view matrices [..., 4, 4].

    The camera centre moves by N(0, translation_std^2) metres per world axis and the camera turns about its own
    centre by an axis-angle vector drawn N(0, rotation_std_rad^2) per camera axis, so ``rotation_std_rad`` reads
    as "degrees of look-direction jitter" independent of where the camera is.
    """
    batch = world_to_camera.shape[:-2]
    opts = {"dtype": world_to_camera.dtype, "device": "cpu"}
    dt = torch.randn(*batch, 3, generator=generator, **opts) * translation_std
    rotvec = torch.randn(*batch, 3, generator=generator, **opts) * rotation_std_rad
    c2w = rigid_inverse(world_to_camera)
    noisy = c2w.clone()
    delta = axis_angle_to_rotmat(rotvec).to(world_to_camera.device)
    noisy[..., :3, :3] = c2w[..., :3, :3] @ delta  # right-multiply: rotation about the camera's own axes
    noisy[..., :3, 3] = c2w[..., :3, 3] + dt.to(world_to_camera.device)
    return rigid_inverse(noisy)


def perturbed(
    camera: PinholeCamera,
    translation_std: float,
    rotation_std_rad: float,
    generator: torch.Generator | None = None,
) -> PinholeCamera:
    """``camera`` with its pose jittered as ``perturb_view`` describes; intrinsics unchanged."""
    return replace(
        camera, world_to_camera=perturb_view(camera.world_to_camera, translation_std, rotation_std_rad, generator)
    )


def stack_cameras(cameras: Sequence[PinholeCamera]) -> tuple[Tensor, Tensor]:
    """Cameras of one image size -> (viewmats [C, 4, 4], Ks [C, 3, 3]) as ``SplatRenderer.render`` takes them."""
    if not cameras:
        raise ValueError("stack_cameras needs at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"stack_cameras: cameras have different image sizes {sorted(sizes)}; resize them first")
    return torch.stack([c.world_to_camera for c in cameras]), torch.stack([c.K for c in cameras])
