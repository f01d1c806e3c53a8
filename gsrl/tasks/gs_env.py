"""``GSEnv-PutCubeOnPlate-v0``: PutCubeOnPlate's physics, observed through 3D Gaussian Splatting.

ManiSkill steps the physics; every camera image comes from a Gaussian scene: one set of Gaussians per rigid body
(robot links, cube, plate, table, floor) in the body's local frame, converted from the simulator's own visual meshes
(``gsrl.splat.scene_gaussians``) or loaded from a scene directory where a user has put a fitted real scan. Each
render places the moving bodies' Gaussians by their poses from physics (for the links, the forward kinematics of the
current joint positions) and draws them with the static bodies, whose projection the renderer caches per camera.

``SplatObserver`` renders many single-env simulations (an env server's batch) in one batched renderer call: the env
server's ``EnvBatch`` takes a ``snapshot`` of each env when it needs an observation and renders them all together.
The gym entry point (``gym.make("GSEnv-PutCubeOnPlate-v0", ...)``) wraps one env with the same observer, for
scripts, videos and the alignment tools.

Observation (``obs_mode="rgb"``): ``rgb/<camera>`` uint8 [H, W, 3] per camera and ``state`` float32 [25], the
proprioception a real robot has: joint positions (9), joint velocities (9) and the TCP pose (position, quaternion
wxyz; 7). Object poses are not observed: they must be read from the pixels.

Image domain randomization (per env, drawn at each episode start from the episode's seed):
- lighting / colour: every Gaussian's colour is multiplied by a brightness factor U(1-b, 1+b) and per-channel gains
  U(1-c, 1+c). The gain is applied after compositing, where it is linear in the Gaussians' colours (exact for the
  view-independent colours of converted meshes), so the static layer's cached projection stays valid;
- camera pose: the third-person camera's pose gets Gaussian translation and rotation noise (the wrist camera is
  rigidly mounted on the hand and is not perturbed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import sapien
import torch
from torch import Tensor

from gsrl.config import GS_TASK_PREFIX, RenderConfig
from gsrl.splat.camera import PinholeCamera, opencv_from_sapien_pose, perturb_view, resized, rigid_inverse
from gsrl.splat.gaussians import SH_C0, GaussianSet, rgb_to_sh_dc
from gsrl.splat.lighting import SceneLights, disc_normals, scene_lights, shade
from gsrl.splat.renderer import SplatRenderer, to_uint8
from gsrl.splat.scene_gaussians import (
    SceneConversion,
    SceneGaussians,
    ScenePart,
    build_scene_gaussians,
    load_scene,
    part_entities,
    part_world_poses,
    save_scene,
)
from gsrl.splat.transforms import place_parts
from gsrl.tasks.put_cube_on_plate import REFERENCE_CAMERA_INTRINSIC, REFERENCE_CAMERA_SIZE, _reference_camera_pose

log = logging.getLogger(__name__)

GS_TASKS = {f"{GS_TASK_PREFIX}PutCubeOnPlate-v0": "PutCubeOnPlate-v0"}
"""Splat-rendered task id -> the physics task it observes."""

PROPRIOCEPTION_KEYS = ("agent/qpos", "agent/qvel", "extra/tcp_pose")
"""Entries of the physics task's ``state_dict`` observation that form the ``state`` vector, in this order."""

WRIST_CAMERA_LINK = "panda_hand"
# The RealSense mount of ManiSkill's panda_v3.urdf (realsense_joint + camera_link_joint) relative to panda_hand,
# in SAPIEN's camera convention (x forward along the approach direction, z up): the view a wrist camera has.
_WRIST_MOUNT_XYZ = (0.035, 0.0, 0.036)
_WRIST_MOUNT_RPY = (0.0, -math.pi / 2, math.pi)
_WRIST_CAMERA_OFFSET = (0.0, 0.02, 0.0115)
WRIST_CAMERA_HFOV_DEG = 90.0

SCENE_CACHE_VERSION = 1


def image_key(camera: str) -> str:
    return f"rgb/{camera}"


def proprioception(flat_state_dict: dict[str, np.ndarray]) -> np.ndarray:
    """[25] float32 proprioceptive state from a flattened, unbatched ``state_dict`` observation."""
    missing = [key for key in PROPRIOCEPTION_KEYS if key not in flat_state_dict]
    if missing:
        raise KeyError(f"state_dict observation lacks {missing} (has {sorted(flat_state_dict)})")
    return np.concatenate(
        [np.asarray(flat_state_dict[key], dtype=np.float32).reshape(-1) for key in PROPRIOCEPTION_KEYS]
    )


def observation_shapes(render: RenderConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the observation entries of a splat task, known without building anything."""
    shapes: dict[str, tuple[int, ...]] = {image_key(c): (render.height, render.width, 3) for c in render.cameras}
    shapes["state"] = (9 + 9 + 7,)
    return shapes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"task.render.device={name!r} but CUDA is not available on this machine")
    return device


def scene_conversion(render: RenderConfig) -> SceneConversion:
    """Mesh -> Gaussian densities from the render config: bodies at ``samples_per_m2``, static backdrop coarser."""
    return SceneConversion(
        body_density=render.samples_per_m2,
        static_density=render.samples_per_m2 / 20.0,
        large_density=render.samples_per_m2 / 40.0,
    )


def load_or_build_scene(env: Any, render: RenderConfig, task_name: str) -> SceneGaussians:
    """The splat scene for ``env``: ``render.scene_dir`` if set, else converted from the sim and cached on disk.

    The cache key covers everything the conversion depends on (task, conversion parameters, ManiSkill version,
    cache format), so a changed setting never reuses a stale scene. Env servers starting together may convert at
    the same time: each writes to a private directory and renames it into place; the first rename wins.
    """
    if render.scene_dir:
        return load_scene(render.scene_dir)
    import mani_skill

    conversion = scene_conversion(render)
    key_data = {
        "task": task_name,
        "conversion": asdict(conversion),
        "mani_skill": mani_skill.__version__,
        "version": SCENE_CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    cache_root = Path(render.cache_dir).expanduser()
    directory = cache_root / f"{task_name}-{digest}"
    if (directory / "scene.json").is_file():
        return load_scene(directory)
    started = time.perf_counter()
    scene = build_scene_gaussians(env, conversion)
    log.info(
        "converted %s's visual meshes to %d Gaussians in %d parts (%.1f s); caching in %s",
        task_name,
        scene.num_gaussians,
        len(scene.parts),
        time.perf_counter() - started,
        directory,
    )
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=cache_root))
        save_scene(staging, scene)
        try:
            os.rename(staging, directory)
        except OSError:  # another process cached it first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the splat scene in %s (%s); converting again next time", cache_root, exc)
    return scene


def reference_camera(width: int, height: int) -> PinholeCamera:
    """The task's calibrated third-person camera (640x480), centre-cropped and scaled to ``width`` x ``height``."""
    c2w = torch.tensor(_reference_camera_pose().to_transformation_matrix(), dtype=torch.float32)
    full_w, full_h = REFERENCE_CAMERA_SIZE
    camera = PinholeCamera(
        K=torch.tensor(REFERENCE_CAMERA_INTRINSIC, dtype=torch.float32),
        width=full_w,
        height=full_h,
        world_to_camera=opencv_from_sapien_pose(c2w),
    )
    return resized(camera, width, height)


def wrist_camera_mount() -> Tensor:
    """hand-from-camera transform [4, 4] (SAPIEN camera convention) of the wrist camera."""
    mount = sapien.Pose(p=list(_WRIST_MOUNT_XYZ))
    mount.set_rpy(list(_WRIST_MOUNT_RPY))
    pose = mount * sapien.Pose(p=list(_WRIST_CAMERA_OFFSET))
    return torch.tensor(pose.to_transformation_matrix(), dtype=torch.float32)


def wrist_intrinsics(width: int, height: int) -> Tensor:
    focal = (width / 2.0) / math.tan(math.radians(WRIST_CAMERA_HFOV_DEG) / 2.0)
    return torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class RenderSnapshot:
    """What rendering one env's observation needs, taken at the moment of the observation.

    ``poses`` [P, 4, 4] world poses of the moving parts, ``viewmats`` [C, 4, 4] OpenCV world->camera per camera,
    ``gain`` [3] the episode's colour gain.
    """

    poses: Tensor
    viewmats: Tensor
    gain: Tensor


STATIC_DEPTH_MARGIN = 0.03
"""Metres by which a moving body may lie behind the static layer's depth at a pixel and still be drawn in front."""


def depth_composite(
    rgb_a: Tensor,
    alpha_a: Tensor,
    depth_a: Tensor,
    rgb_b: Tensor,
    alpha_b: Tensor,
    depth_b: Tensor,
    margin: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Two premultiplied layers [..., H, W, 3] / [..., 1] composited per pixel, the nearer (expected depth) in front;
    layer a counts as nearer unless it is more than ``margin`` metres behind b.

    Splatting sorts Gaussians by their centres' depth, which puts a large flat table disc lying under the 1 cm plate
    in front of plate discs farther back: the table shows through. Rendering moving and static bodies as separate
    layers and ordering them per pixel keeps each layer's own sort (fine within one body) and gets the occlusion
    between them right, also where the robot reaches below the table's edge. A layer's depth at a pixel is the
    blend of its Gaussians' *centre* depths, which for the coarse table discs (a few cm wide) can read up to a
    couple of centimetres nearer than the surface: the margin absorbs that. Physics keeps moving bodies out of the
    table, so nothing real hides within the margin behind a static surface.
    """
    a_in_front = (depth_a <= depth_b + margin) | (alpha_b <= 0)
    front_rgb = torch.where(a_in_front, rgb_a, rgb_b)
    front_alpha = torch.where(a_in_front, alpha_a, alpha_b)
    back_rgb = torch.where(a_in_front, rgb_b, rgb_a)
    back_alpha = torch.where(a_in_front, alpha_b, alpha_a)
    return front_rgb + (1.0 - front_alpha) * back_rgb, front_alpha + (1.0 - front_alpha) * back_alpha


class SplatObserver:
    """Renders the camera observations of a list of single-env ManiSkill simulations in one batched call.

    Args:
        envs: the simulations (``env.unwrapped`` of ``gym.make(<physics task>, num_envs=1)``), all of one task;
            the scene is converted from the first.
        render: image size, cameras, backend, scene source and randomization.
    """

    def __init__(self, envs: Sequence[Any], render: RenderConfig) -> None:
        if not envs:
            raise ValueError("SplatObserver needs at least one env")
        for env in envs:
            if env.num_envs != 1:
                raise ValueError(f"SplatObserver drives single-env simulations, got one with num_envs={env.num_envs}")
        self.envs = list(envs)
        self.config = render
        self.device = resolve_device(render.device)
        self.renderer = SplatRenderer(render.backend, self.device, background=(0.0, 0.0, 0.0))
        self.background = torch.tensor(render.background, dtype=torch.float32, device=self.device)
        self.scene = load_or_build_scene(self.envs[0], render, type(self.envs[0]).__name__)
        lit = render.lighting == "sim" or (render.lighting == "auto" and not render.scene_dir)
        self.lights: SceneLights | None = scene_lights(self.envs[0]) if lit else None
        self._build_layers()
        self._build_cameras()
        num_envs = len(self.envs)
        self._gains = torch.ones(num_envs, 3)
        self._third_person_views = self._base_view[None].repeat(num_envs, 1, 1)

    # ------------------------------------------------------------------ setup

    def _build_layers(self) -> None:
        static = [p for p in self.scene.parts if p.static]
        self.moving_parts: list[ScenePart] = [p for p in self.scene.parts if not p.static]
        if not self.moving_parts:
            raise ValueError("the splat scene has no moving parts (robot links, objects): nothing would move")
        dev = self.device
        self._static: GaussianSet | None = None
        # (viewmat bytes, K bytes) -> (rgb, alpha, depth) of the static layer; bounded for cameras that move.
        self._static_cache: dict[tuple[bytes, bytes], tuple[Tensor, Tensor, Tensor]] = {}
        self._static_cache_size = 4 * len(self.envs) * max(1, len(self.config.cameras)) + 8
        if static:
            poses = part_world_poses(self.envs[0], static)[0]
            world = []
            for part, pose in zip(static, poses, strict=True):
                means, quats = place_parts(
                    part.gaussians.means,
                    part.gaussians.quats,
                    torch.zeros(len(part.gaussians), dtype=torch.long),
                    pose[None, None],
                )
                g = part.gaussians
                sh = g.sh
                if self.lights is not None:  # static: light once, at the pose it keeps
                    albedo = SH_C0 * g.sh[:, 0] + 0.5
                    sh = g.sh.clone()
                    sh[:, 0] = rgb_to_sh_dc(shade(albedo, disc_normals(quats[0]), self.lights))
                world.append(GaussianSet(means[0], quats[0], g.log_scales, g.opacity_logits, sh))
            self._static = GaussianSet.concat(world).to(dev)
        moving = GaussianSet.concat([p.gaussians for p in self.moving_parts])
        self.sh_degree = moving.sh_degree
        self._means = moving.means.to(dev)
        self._quats = moving.quats.to(dev)
        self._scales = moving.scales.to(dev)
        self._opacities = moving.opacities.to(dev)
        self._sh = moving.sh.to(dev)
        self._albedo = (SH_C0 * moving.sh[:, 0] + 0.5).to(dev)  # sRGB, view-independent part
        if self.lights is not None and self.sh_degree > 0:
            raise ValueError(
                "task.render.lighting applies the simulator's lights to mesh-converted Gaussians (SH degree 0); "
                f"this scene's moving parts have SH degree {self.sh_degree}: set task.render.lighting=none"
            )
        self._local_normals = disc_normals(moving.quats).to(dev)
        self._entities = [part_entities(env, self.moving_parts) for env in self.envs]
        self._part_index = torch.cat(
            [torch.full((len(p.gaussians),), i, dtype=torch.long) for i, p in enumerate(self.moving_parts)]
        ).to(dev)

    def _build_cameras(self) -> None:
        cfg = self.config
        self.cameras = list(cfg.cameras)
        third = reference_camera(cfg.width, cfg.height)
        self._base_view = third.world_to_camera
        Ks = []
        for camera in self.cameras:
            Ks.append(third.K if camera == "3rd_view_camera" else wrist_intrinsics(cfg.width, cfg.height))
        self._Ks = torch.stack(Ks)
        self._wrist_mount = wrist_camera_mount()
        self._hand_links = None
        if "wrist_camera" in self.cameras:
            self._hand_links = [env.agent.robot.links_map[WRIST_CAMERA_LINK] for env in self.envs]

    # ------------------------------------------------------------------ the API EnvBatch uses

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {image_key(c): (self.config.height, self.config.width, 3) for c in self.cameras}

    @staticmethod
    def proprioception(flat_state_dict: dict[str, np.ndarray]) -> np.ndarray:
        return proprioception(flat_state_dict)

    def new_episode(self, env_index: int, seed: int) -> None:
        """Draw env ``env_index``'s image randomization for its new episode from the episode's ``seed``."""
        cfg = self.config
        generator = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
        gain = torch.ones(3)
        if cfg.brightness > 0:
            gain = gain * (1.0 + (torch.rand(1, generator=generator) * 2 - 1) * cfg.brightness)
        if cfg.color_jitter > 0:
            gain = gain * (1.0 + (torch.rand(3, generator=generator) * 2 - 1) * cfg.color_jitter)
        self._gains[env_index] = gain
        view = self._base_view
        if cfg.camera_translation_std > 0 or cfg.camera_rotation_std_deg > 0:
            view = perturb_view(
                view, cfg.camera_translation_std, math.radians(cfg.camera_rotation_std_deg), generator=generator
            )
        self._third_person_views[env_index] = view

    def snapshot(self, env_index: int) -> RenderSnapshot:
        poses = torch.from_numpy(
            np.stack([entity.pose.to_transformation_matrix() for entity in self._entities[env_index]])
        ).to(torch.float32)
        views = []
        for camera in self.cameras:
            if camera == "3rd_view_camera":
                views.append(self._third_person_views[env_index])
            else:
                hand = self._hand_links[env_index].pose.to_transformation_matrix()[0].to(torch.float32)
                views.append(opencv_from_sapien_pose(hand @ self._wrist_mount))
        return RenderSnapshot(poses=poses, viewmats=torch.stack(views), gain=self._gains[env_index].clone())

    @torch.no_grad()
    def render_float(self, snapshots: Sequence[RenderSnapshot]) -> Tensor:
        """Images [n, C, H, W, 3] float in [0, 1] for ``snapshots``: one renderer call for the moving parts (and one
        for static views not in the cache), composited per pixel by depth with the static layer."""
        dev = self.device
        n, c = len(snapshots), len(self.cameras)
        poses = torch.stack([s.poses for s in snapshots]).to(dev)
        viewmats_host = torch.stack([s.viewmats for s in snapshots])
        viewmats = viewmats_host.to(dev)
        Ks = self._Ks.to(dev).expand(n, -1, -1, -1)
        means, quats = place_parts(self._means, self._quats, self._part_index, poses)
        if self.lights is not None:  # moving parts: shade with this step's world normals
            rotations = poses[:, self._part_index, :3, :3]  # [n, N, 3, 3]
            normals = (rotations @ self._local_normals[None, :, :, None])[..., 0]
            colors, sh_degree = shade(self._albedo.expand_as(normals), normals, self.lights), None
        else:
            colors, sh_degree = self._sh, self.sh_degree
        moving = self.renderer.render(
            means,
            quats,
            self._scales,
            self._opacities,
            colors,
            viewmats,
            Ks,
            self.config.width,
            self.config.height,
            sh_degree=sh_degree,
        )
        rgb, alpha = moving.rgb, moving.alpha  # over black: rgb is the premultiplied colour
        if self._static is not None:
            s_rgb, s_alpha, s_depth = self._static_views(
                viewmats.reshape(n * c, 4, 4), self._Ks.to(dev).repeat(n, 1, 1)
            )
            s_rgb, s_alpha, s_depth = (t.reshape(n, c, *t.shape[1:]) for t in (s_rgb, s_alpha, s_depth))
            rgb, alpha = depth_composite(rgb, alpha, moving.depth, s_rgb, s_alpha, s_depth, STATIC_DEPTH_MARGIN)
        gains = torch.stack([s.gain for s in snapshots]).to(dev)[:, None, None, None, :]
        return (rgb * gains + (1.0 - alpha) * self.background).clamp(0.0, 1.0)

    def _static_views(self, viewmats: Tensor, Ks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The static layer seen by cameras viewmats [m, 4, 4] / Ks [m, 3, 3]: (rgb, alpha, depth) [m, H, W, .].

        Static bodies never move, so a camera that does not move either (the third-person camera, per episode)
        renders them once; only views missing from the cache (new camera noise, the wrist camera) are rendered,
        all in one call.
        """
        # Keys from host tensors: hashing device tensors would synchronize with the GPU once per view.
        viewmats, Ks = viewmats.cpu(), Ks.cpu()  # (no-ops for the host tensors render_float passes)
        keys = [(v.numpy().tobytes(), k.numpy().tobytes()) for v, k in zip(viewmats, Ks, strict=True)]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._static_cache}, key=lambda i: keys[i])
        missing_keys = list(dict.fromkeys(keys[i] for i in missing))
        if missing_keys:
            first = [keys.index(key) for key in missing_keys]
            static = self._static
            out = self.renderer.render(
                static.means,
                static.quats,
                static.scales,
                static.opacities,
                static.sh,
                viewmats[first].to(self.device),
                Ks[first].to(self.device),
                self.config.width,
                self.config.height,
                sh_degree=static.sh_degree,
            )
            for j, key in enumerate(missing_keys):
                self._static_cache[key] = (out.rgb[j], out.alpha[j], out.depth[j])
            while len(self._static_cache) > self._static_cache_size:
                self._static_cache.pop(next(iter(self._static_cache)))
        views = [self._static_cache[key] for key in keys]
        return tuple(torch.stack([v[i] for v in views]) for i in range(3))  # type: ignore[return-value]

    def render(self, snapshots: Sequence[RenderSnapshot]) -> dict[str, np.ndarray]:
        """uint8 images per observation key, each [n, H, W, 3], for ``snapshots`` (one renderer call)."""
        frames = to_uint8(self.render_float(snapshots)).cpu().numpy()
        return {image_key(c): np.ascontiguousarray(frames[:, k]) for k, c in enumerate(self.cameras)}

    def camera_poses(self, env_index: int) -> dict[str, Tensor]:
        """Camera-to-world [4, 4] (OpenCV) of each camera of env ``env_index`` now, e.g. for SAPIEN comparisons."""
        views = self.snapshot(env_index).viewmats
        return {camera: rigid_inverse(views[k]) for k, camera in enumerate(self.cameras)}

    def close(self) -> None:
        self.envs = []


class GSRenderWrapper(gym.Wrapper):
    """One ManiSkill env observed through a ``SplatObserver`` (the gym face of ``GSEnv-*`` tasks).

    Observations are ``{"state": [1, 25] float32, "rgb": {camera: [1, H, W, 3] uint8}}`` torch tensors, batched
    like ManiSkill's. ``render()`` returns the first camera's frame, so ManiSkill's video recorder works unchanged.
    """

    def __init__(self, env: gym.Env, render: RenderConfig) -> None:
        super().__init__(env)
        self.observer = SplatObserver([env.unwrapped], render)
        self._last_frames: dict[str, np.ndarray] | None = None

    def _observe(self, obs: Any) -> dict[str, Any]:
        from gsrl.env_spec import flatten_observation

        flat = {
            k: (v.cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))[0]
            for k, v in flatten_observation(obs).items()
        }
        self._last_frames = self.observer.render([self.observer.snapshot(0)])
        return {
            "state": torch.from_numpy(proprioception(flat))[None],
            "rgb": {key.split("/", 1)[1]: torch.from_numpy(frames) for key, frames in self._last_frames.items()},
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self.observer.new_episode(0, 0 if seed is None else seed)
        return self._observe(obs), info

    def step(self, action: Any) -> tuple[Any, Any, Any, Any, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(obs), reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        if self._last_frames is None:
            raise RuntimeError("call reset() before render()")
        return next(iter(self._last_frames.values()))[0]


def make_gs_env(physics_task: str, render: RenderConfig | dict | None = None, **kwargs: Any) -> gym.Env:
    """``gym.make`` entry point: the physics task (state_dict observations) wrapped by ``GSRenderWrapper``."""
    if isinstance(render, dict):
        render = RenderConfig(**render)
    obs_mode = kwargs.pop("obs_mode", "rgb")
    if obs_mode != "rgb":
        raise ValueError(f"{GS_TASK_PREFIX}{physics_task} renders images: obs_mode must be 'rgb', got {obs_mode!r}")
    kwargs.setdefault("sim_backend", "physx_cpu")
    env = gym.make(physics_task, obs_mode="state_dict", **kwargs)
    return GSRenderWrapper(env, render or RenderConfig())


for _gs_id, _physics_id in GS_TASKS.items():
    if _gs_id not in gym.registry:
        gym.register(_gs_id, entry_point=make_gs_env, kwargs={"physics_task": _physics_id}, disable_env_checker=True)
