"""Posed multi-view image datasets: rendered from a ManiSkill scene with SAPIEN, or brought as a nerfstudio folder.

A ``ViewDataset`` is what ``gsrl.splat.fit`` fits a splat to: images uint8 [N, H, W, 3], one ``PinholeCamera``
per image (OpenCV convention: x right, y down, z forward; ``world_to_camera`` [4, 4]; K in pixels with pixel
(i, j) covering [j, j+1) x [i, i+1)), optionally depth float32 [N, H, W] in metres along the camera z axis
(0 where no surface was hit).

On disk a dataset is a folder in the nerfstudio / instant-ngp ``transforms.json`` convention, so posed captures
from ``ns-process-data`` (COLMAP) load the same way as simulator renders:

    folder/transforms.json
    folder/images/frame_00000.png          (RGB, or RGBA composited over black on load)
    folder/depths/frame_00000.png          (optional, uint16 millimetres, 0 = no depth: nerfstudio's default)

    transforms.json = {
      "camera_model": "OPENCV",
      "fl_x", "fl_y", "cx", "cy": pixels, "w", "h": pixels,    # shared intrinsics (a frame may override them)
      "k1", "k2", "p1", "p2": 0 (non-zero values are undistorted on load, see ``load_dataset``),
      "frames": [{"file_path": "images/frame_00000.png",
                  "transform_matrix": 4x4 camera-to-world, OpenGL/Blender axes (x right, y up, z backward),
                  "depth_file_path": "depths/frame_00000.png"}, ...],
      "depth_unit_scale_factor": 0.001,                         # metres per depth PNG unit
      "background_color": [r, g, b] in [0, 1]                   # gsrl extension: colour where nothing was hit
    }

The OpenGL camera-to-world matrix is the OpenCV one with its y and z columns negated: c2w_gl = c2w_cv @
diag(1, -1, -1, 1). Poses are kept in the file's frame and units: unlike nerfstudio's dataparser, nothing is
re-centred, re-oriented or re-scaled on load (a scan's frame is mapped to the sim's by ``gsrl.splat.align``).
``camera_angle_x`` (the Blender/instant-ngp synthetic format) is accepted in place of focal lengths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsrl.splat.camera import PinholeCamera, intrinsics, look_at

OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiplying a camera-to-world matrix by this flips its y and z axes (OpenCV <-> OpenGL); self-inverse."""

DEPTH_UNIT = 0.001
"""Metres per unit of a saved depth PNG (uint16 millimetres, nerfstudio's default depth_unit_scale_factor)."""


@dataclass
class ViewDataset:
    """N posed images. ``images`` uint8 [N, H, W, 3]; ``cameras`` N ``PinholeCamera``; ``depths`` float32
    [N, H, W] metres or None; ``names`` N file stems; ``background`` the RGB in [0, 1] seen where no surface is
    (known for simulator renders, None for real captures)."""

    images: np.ndarray
    cameras: list[PinholeCamera]
    depths: np.ndarray | None = None
    names: list[str] | None = None
    background: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            got = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise ValueError(f"ViewDataset.images must be uint8 [N, H, W, 3], got {got}")
        n, height, width = self.images.shape[:3]
        if len(self.cameras) != n:
            raise ValueError(f"ViewDataset has {n} images but {len(self.cameras)} cameras")
        for i, camera in enumerate(self.cameras):
            if (camera.width, camera.height) != (width, height):
                raise ValueError(f"camera {i} is {camera.width}x{camera.height}, the images are {width}x{height}")
        if self.depths is not None and self.depths.shape != (n, height, width):
            raise ValueError(f"ViewDataset.depths must be [N, H, W] = {(n, height, width)}, got {self.depths.shape}")
        if self.names is None:
            self.names = [f"frame_{i:05d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.cameras)

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: Sequence[int]) -> ViewDataset:
        idx = list(indices)
        return ViewDataset(
            images=self.images[idx],
            cameras=[self.cameras[i] for i in idx],
            depths=None if self.depths is None else self.depths[idx],
            names=[self.names[i] for i in idx] if self.names else None,
            background=self.background,
        )

    def split(self, test_every: int = 8) -> tuple[ViewDataset, ViewDataset]:
        """(train, test): every ``test_every``-th view (0, k, 2k, ...) is held out, as gsplat's trainer and
        nerfstudio's eval split do, so held-out views are spread over the whole capture."""
        if test_every < 2:
            raise ValueError(f"test_every must be >= 2, got {test_every}")
        test = list(range(0, len(self), test_every))
        train = [i for i in range(len(self)) if i % test_every]
        return self.subset(train), self.subset(test)

    def camera_centers(self) -> np.ndarray:
        """[N, 3] camera positions in world coordinates."""
        return torch.stack([c.position for c in self.cameras]).double().numpy()


# ---------------------------------------------------------------------------------------------------- camera rigs


def _pinhole(world_to_camera: torch.Tensor, width: int, height: int, fov_y_deg: float) -> PinholeCamera:
    focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return PinholeCamera(intrinsics(focal, focal, width / 2, height / 2), width, height, world_to_camera.float())


def hemisphere_cameras(
    target: Sequence[float],
    radius: float,
    num_views: int,
    width: int,
    height: int,
    fov_y_deg: float = 60.0,
    min_elevation_deg: float = 15.0,
    max_elevation_deg: float = 75.0,
    azimuth_offset_deg: float = 0.0,
) -> list[PinholeCamera]:
    """``num_views`` cameras spread evenly (Fibonacci spiral, equal area) over a band of the upper hemisphere of
    ``radius`` metres around ``target`` (world, z up), all looking at it with square pixels and ``fov_y_deg``.

    Deterministic, so a dataset can be regenerated; evenly spread views keep every held-out view close to some
    training views, which is what makes held-out PSNR meaningful for a small number of views.
    """
    target_t = torch.as_tensor(target, dtype=torch.float64)
    z_lo, z_hi = math.sin(math.radians(min_elevation_deg)), math.sin(math.radians(max_elevation_deg))
    golden = math.pi * (3.0 - math.sqrt(5.0))
    cameras = []
    for i in range(num_views):
        z = z_lo + (z_hi - z_lo) * (i + 0.5) / num_views  # uniform in z = uniform in area on the sphere
        azimuth = math.radians(azimuth_offset_deg) + golden * i
        r_xy = math.sqrt(max(0.0, 1.0 - z * z))
        direction = torch.tensor([r_xy * math.cos(azimuth), r_xy * math.sin(azimuth), z], dtype=torch.float64)
        cameras.append(_pinhole(look_at(target_t + radius * direction, target_t), width, height, fov_y_deg))
    return cameras


def ring_cameras(
    target: Sequence[float],
    radius: float,
    elevation_deg: float,
    num_views: int,
    width: int,
    height: int,
    fov_y_deg: float = 60.0,
    azimuth_offset_deg: float = 0.0,
) -> list[PinholeCamera]:
    """``num_views`` cameras at equal azimuth steps on a horizontal circle at ``elevation_deg`` above ``target``."""
    target_t = torch.as_tensor(target, dtype=torch.float64)
    elevation = math.radians(elevation_deg)
    cameras = []
    for i in range(num_views):
        azimuth = math.radians(azimuth_offset_deg) + 2 * math.pi * i / num_views
        direction = torch.tensor(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)],
            dtype=torch.float64,
        )
        cameras.append(_pinhole(look_at(target_t + radius * direction, target_t), width, height, fov_y_deg))
    return cameras


# ---------------------------------------------------------------------------------------------------- SAPIEN


def sapien_pose_from_opencv(world_to_camera: torch.Tensor) -> Any:
    """OpenCV world->camera [4, 4] -> the ``sapien.Pose`` of a SAPIEN camera entity (x forward, y left, z up).

    Inverse of ``gsrl.splat.camera.opencv_from_sapien_pose``: forward = z_cv, left = -x_cv, up = -y_cv.
    """
    import sapien

    c2w = np.linalg.inv(world_to_camera.double().cpu().numpy())
    rotation = c2w[:3, :3]
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = rotation[:, 2], -rotation[:, 0], -rotation[:, 1]
    pose[:3, 3] = c2w[:3, 3]
    return sapien.Pose(pose)


def _sub_scene(scene: Any) -> Any:
    """The ``sapien.Scene`` behind a gym env, a ManiSkill env or scene, or a sapien scene (first sub-scene)."""
    scene = getattr(scene, "unwrapped", scene)
    scene = getattr(scene, "scene", scene)
    if hasattr(scene, "sub_scenes"):
        if len(scene.sub_scenes) != 1:
            raise ValueError("render_sapien_views renders one scene; make the env with num_envs=1 (CPU sim)")
        return scene.sub_scenes[0]
    return scene


def _is_static(entity: Any) -> bool:
    """True for entities that never move in an episode: static or kinematic rigid bodies (the table, the ground).
    Articulation links (the robot) and dynamic bodies (cube, plate) are not static."""
    import sapien

    if entity.find_component_by_type(sapien.physx.PhysxArticulationLinkComponent) is not None:
        return False
    dynamic = entity.find_component_by_type(sapien.physx.PhysxRigidDynamicComponent)
    return dynamic is None or bool(dynamic.kinematic)


def render_sapien_views(
    scene: Any,
    cameras: Sequence[PinholeCamera],
    *,
    static_only: bool = False,
    hide: Sequence[str] = (),
    depth: bool = False,
    shader: str = "default",
    near: float = 0.01,
    far: float = 100.0,
) -> ViewDataset:
    """Render ``cameras`` of a ManiSkill scene at its current state with SAPIEN's renderer (CPU sim, one env).

    ``scene`` is a gym env (``gym.make``), a ManiSkill env or scene, or a ``sapien.Scene``. One temporary camera
    entity is added to the scene, moved to each pose (``sapien_pose_from_opencv``) with each camera's K set
    exactly (``set_perspective_parameters``: fx, fy, cx, cy, no skew) and removed afterwards; ManiSkill's own
    sensors are left untouched. ``static_only`` hides the robot and every dynamic object, leaving what a static
    splat layer would hold (table, ground); ``hide`` hides entities whose name contains one of the strings (e.g.
    ``"ground"``). Hidden entities are shown again before returning.

    ``shader`` is a SAPIEN shader pack ("default" or "minimal"); depth comes from its position texture (metres
    along the camera axis, 0 where nothing was hit). The first render compiles shaders (seconds on lavapipe).
    """
    import sapien

    if shader not in ("default", "minimal"):
        raise ValueError(f"shader must be 'default' or 'minimal', got {shader!r}")
    if not cameras:
        raise ValueError("render_sapien_views needs at least one camera")
    sub_scene = _sub_scene(scene)
    width, height = cameras[0].width, cameras[0].height
    if any((c.width, c.height) != (width, height) for c in cameras):
        raise ValueError("render_sapien_views: all cameras must have one image size")

    hidden = []
    for entity in sub_scene.entities:
        body = entity.find_component_by_type(sapien.render.RenderBodyComponent)
        if body is None:
            continue
        if (static_only and not _is_static(entity)) or any(key in entity.name for key in hide):
            hidden.append((body, body.visibility))
            body.visibility = 0.0

    shader_dir = os.path.join(os.path.dirname(sapien.render.get_camera_shader_dir()), shader)
    component = sapien.render.RenderCameraComponent(width, height, shader_dir)
    mount = sapien.Entity()
    mount.name = "gsrl_view_camera"
    mount.add_component(component)
    sub_scene.add_entity(mount)
    images, depths, background_pixels = [], [], []
    try:
        for camera in cameras:
            k = camera.K.double()
            component.set_perspective_parameters(
                near, far, float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]), 0.0
            )
            mount.set_pose(sapien_pose_from_opencv(camera.world_to_camera))
            sub_scene.update_render()
            component.take_picture()
            rgba = component.get_picture("Color")
            if rgba.dtype != np.uint8:  # the picture format is a global SAPIEN setting ManiSkill changes per shader
                rgba = np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint8)
            images.append(rgba[..., :3].copy())
            background_pixels.append(rgba[rgba[..., 3] == 0][:, :3])
            if depth:
                depths.append(_depth_from_position(component, shader))
    finally:
        sub_scene.remove_entity(mount)
        for body, visibility in hidden:
            body.visibility = visibility

    seen = np.concatenate(background_pixels)
    background = tuple(float(v) / 255.0 for v in np.median(seen, axis=0)) if len(seen) else None
    return ViewDataset(
        images=np.stack(images),
        cameras=list(cameras),
        depths=np.stack(depths) if depth else None,
        background=background,
    )


def _depth_from_position(component: Any, shader: str) -> np.ndarray:
    """[H, W] float32 metres from SAPIEN's position texture (OpenGL camera space, so depth = -z; 0 = no hit)."""
    if shader == "default":
        position = component.get_picture("Position")
        depth = -position[..., 2]
        depth[position[..., 3] >= 1.0] = 0.0  # the depth buffer stays at 1 where nothing was drawn
    else:
        position = component.get_picture("PositionSegmentation")
        # int16 millimetres in ManiSkill's minimal format; a float format (set by another shader) is metres
        depth = -position[..., 2].astype(np.float32) * (DEPTH_UNIT if position.dtype == np.int16 else 1.0)
    return np.maximum(depth, 0.0).astype(np.float32)


def render_task_views(
    cameras: Sequence[PinholeCamera],
    env_id: str = "PutCubeOnPlate-v0",
    seed: int = 0,
    static_only: bool = True,
    hide: Sequence[str] = (),
    depth: bool = False,
    **env_kwargs: Any,
) -> ViewDataset:
    """Make a gsrl/ManiSkill task on the CPU sim, reset it with ``seed`` and render ``cameras`` of it
    (``render_sapien_views``); by default only its static layer (table and ground), as a static splat holds."""
    import gymnasium as gym

    import gsrl.tasks  # noqa: F401  (registers the gsrl tasks)

    options = {"obs_mode": "none", "sim_backend": "physx_cpu", "num_envs": 1} | env_kwargs
    env = gym.make(env_id, **options)
    try:
        env.reset(seed=seed)
        return render_sapien_views(env, cameras, static_only=static_only, hide=hide, depth=depth)
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------- folders


def _camera_to_world_opengl(camera: PinholeCamera) -> np.ndarray:
    return camera.camera_to_world.double().numpy() @ OPENGL_FROM_OPENCV


def save_dataset(dataset: ViewDataset, folder: str | os.PathLike) -> Path:
    """Write ``dataset`` as ``folder/transforms.json`` + ``images/*.png`` (+ ``depths/*.png``); returns the json
    path. Intrinsics shared by all views are written once at the top level, otherwise per frame."""
    import cv2

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ks = [c.K.double().numpy() for c in dataset.cameras]
    shared = all(np.allclose(k, ks[0]) for k in ks)

    def intrinsic_fields(k: np.ndarray) -> dict[str, float]:
        return {"fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2])}

    frames = []
    for i, (name, camera) in enumerate(zip(dataset.names, dataset.cameras, strict=True)):
        frame: dict[str, Any] = {
            "file_path": f"images/{name}.png",
            "transform_matrix": _camera_to_world_opengl(camera).tolist(),
        }
        cv2.imwrite(str(folder / frame["file_path"]), cv2.cvtColor(dataset.images[i], cv2.COLOR_RGB2BGR))
        if dataset.depths is not None:
            (folder / "depths").mkdir(exist_ok=True)
            frame["depth_file_path"] = f"depths/{name}.png"
            depth_mm = np.clip(np.rint(dataset.depths[i] / DEPTH_UNIT), 0, np.iinfo(np.uint16).max)
            cv2.imwrite(str(folder / frame["depth_file_path"]), depth_mm.astype(np.uint16))
        if not shared:
            frame |= intrinsic_fields(ks[i])
        frames.append(frame)
    meta: dict[str, Any] = {"camera_model": "OPENCV", "w": dataset.width, "h": dataset.height}
    if shared:
        meta |= intrinsic_fields(ks[0])
    meta |= {"k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    if dataset.depths is not None:
        meta["depth_unit_scale_factor"] = DEPTH_UNIT
    if dataset.background is not None:
        meta["background_color"] = list(dataset.background)
    meta["frames"] = frames
    path = folder / "transforms.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def _frame_intrinsics(meta: dict[str, Any], frame: dict[str, Any], width: int, height: int) -> tuple[float, ...]:
    """(fx, fy, cx, cy) of a frame: its own keys, else the file's, else from ``camera_angle_x`` (Blender)."""

    def get(key: str) -> Any:
        return frame.get(key, meta.get(key))

    fx, fy = get("fl_x"), get("fl_y")
    if fx is None and get("camera_angle_x") is not None:
        fx = 0.5 * width / math.tan(0.5 * float(get("camera_angle_x")))
    if fx is None:
        raise ValueError("transforms.json gives neither fl_x nor camera_angle_x")
    if fy is None:
        fy = 0.5 * height / math.tan(0.5 * float(get("camera_angle_y"))) if get("camera_angle_y") else fx
    cx = get("cx") if get("cx") is not None else width / 2
    cy = get("cy") if get("cy") is not None else height / 2
    return float(fx), float(fy), float(cx), float(cy)


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:  # composite over black, so transparent pixels render as "nothing there"
        alpha = image[:, :, 3:].astype(np.float32) / 255.0
        image = np.rint(image[:, :, :3] * alpha).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_dataset(folder: str | os.PathLike, downscale: int = 1) -> ViewDataset:
    """Read a ``transforms.json`` folder (see the module docstring) into a ``ViewDataset``.

    ``downscale`` divides the image size (cv2 area resampling) and scales K by the exact per-axis size ratio.
    Frames with OPENCV radial/tangential distortion (k1, k2, p1, p2, and k3 if present) are undistorted to the
    same K with ``cv2.undistort``, so every returned camera is an ideal pinhole as the rasterizer assumes; the
    fisheye model is refused. All frames must end up one size.
    """
    import cv2

    folder = Path(folder)
    meta = json.loads((folder / "transforms.json").read_text())
    if str(meta.get("camera_model", "OPENCV")).upper() not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE"):
        raise ValueError(f"{folder}: camera_model {meta['camera_model']!r} is not supported (pinhole/OPENCV only)")
    images, cameras, depths, names = [], [], [], []
    has_depth = bool(meta["frames"]) and all("depth_file_path" in f for f in meta["frames"])
    depth_unit = float(meta.get("depth_unit_scale_factor", DEPTH_UNIT))
    for frame in meta["frames"]:
        image_path = folder / frame["file_path"]
        if not image_path.suffix:  # instant-ngp's Blender scenes omit the extension
            image_path = image_path.with_suffix(".png")
        image = _read_rgb(image_path)
        height, width = image.shape[:2]
        fx, fy, cx, cy = _frame_intrinsics(meta, frame, width, height)
        k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        distortion = np.array([float(frame.get(key, meta.get(key, 0.0))) for key in ("k1", "k2", "p1", "p2", "k3")])
        if np.any(distortion != 0):
            image = cv2.undistort(image, k, distortion)
        depth = None
        if has_depth:
            raw = cv2.imread(str(folder / frame["depth_file_path"]), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise FileNotFoundError(f"cannot read depth image {folder / frame['depth_file_path']}")
            depth = raw.astype(np.float32) * depth_unit
        if downscale > 1:
            new_w, new_h = max(1, round(width / downscale)), max(1, round(height / downscale))
            k[0] *= new_w / width
            k[1] *= new_h / height
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
            if depth is not None:  # nearest: averaging depths across an edge invents surfaces in between
                depth = cv2.resize(depth, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
            width, height = new_w, new_h
        c2w_cv = np.asarray(frame["transform_matrix"], dtype=np.float64) @ OPENGL_FROM_OPENCV
        world_to_camera = torch.as_tensor(np.linalg.inv(c2w_cv), dtype=torch.float32)
        cameras.append(PinholeCamera(torch.as_tensor(k, dtype=torch.float32), width, height, world_to_camera))
        images.append(image)
        depths.append(depth)
        names.append(Path(frame["file_path"]).stem)
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(sizes)}")
    background = meta.get("background_color")
    return ViewDataset(
        images=np.stack(images),
        cameras=cameras,
        depths=np.stack(depths) if has_depth else None,
        names=names,
        background=tuple(background) if background is not None else None,
    )
