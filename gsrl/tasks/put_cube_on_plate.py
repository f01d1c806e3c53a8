"""ManiSkill 3 task ``PutCubeOnPlate-v0``: a Panda arm picks up a cube and places it on a flat plate.

A reimplementation of RLinf's GSEnv task (see /work/shared/reference/gsenv-putcubeonplate.md, section 1) on
ManiSkill's own Panda and table scene, with a success test that requires a real placement (released, resting,
static) next to the reference's looser test, and a staged dense reward so PPO from state can learn it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import sapien
import torch
from mani_skill.agents.robots import Panda
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import sapien_utils
from mani_skill.utils.geometry.rotation_conversions import quaternion_apply, quaternion_invert
from mani_skill.utils.registration import register_env
from mani_skill.utils.scene_builder.table import TableSceneBuilder
from mani_skill.utils.structs.pose import Pose
from mani_skill.utils.structs.types import SceneConfig, SimConfig

LANGUAGE_INSTRUCTION = "pick up the cube and put it on the plate"
"""The reference's instruction, verbatim (fact sheet 1.6); identical for every env."""

SuccessMode = Literal["strict", "rlinf"]

# Where TableSceneBuilder puts the Panda base (world frame). The reference scene has the robot base at the world
# origin; every reference position below is given in that robot-base frame and shifted by this offset, so the
# robot-relative geometry (reach, camera view) is the reference's.
ROBOT_BASE_POSE = sapien.Pose(p=[-0.615, 0.0, 0.0])

# Reference initial arm configuration (FR3_DEFAULT_CFG, fact sheet 1.3). Panda and FR3 share joint layout and
# near-identical kinematics, and this pose holds the gripper lower and closer to the objects than ManiSkill's
# "rest" keyframe, which is what the reference's demonstrations and scans start from.
REFERENCE_INIT_QPOS = np.array([0.0, 0.259358403, 0.0, -2.28914773, 0.0, 2.51473323, 0.785539902, 0.04, 0.04])

# Reference third-person camera "3rd_view_camera" (fact sheet 1.8), a calibrated real camera. SAPIEN convention
# (x forward, y left, z up), pose in the robot-base frame.
_REFERENCE_CAMERA_ROTATION = np.array(
    [
        [0.68370109, -0.50239316, 0.52929587],
        [0.33318036, 0.86018832, 0.38609201],
        [-0.64926404, -0.08762054, 0.75549905],
    ]
)
_REFERENCE_CAMERA_TRANSLATION = np.array([0.075, -0.161, 0.497])
REFERENCE_CAMERA_INTRINSIC = np.array([[604.152161, 0.0, 316.670074], [0.0, 604.267212, 243.194473], [0.0, 0.0, 1.0]])
REFERENCE_CAMERA_SIZE = (640, 480)  # (width, height)


def _reference_camera_pose() -> sapien.Pose:
    """The reference camera pose moved into this scene's world frame (robot base at ``ROBOT_BASE_POSE``)."""
    matrix = np.eye(4)
    matrix[:3, :3] = _REFERENCE_CAMERA_ROTATION
    matrix[:3, 3] = _REFERENCE_CAMERA_TRANSLATION
    return ROBOT_BASE_POSE * sapien.Pose(matrix)


@register_env("PutCubeOnPlate-v0", max_episode_steps=100)
class PutCubeOnPlateEnv(BaseEnv):
    """
    **Task Description:**
    Pick up a 4 cm cube with the Panda arm and put it on a flat square plate (16 cm wide, 1 cm tall, about four
    cubes wide), then let go of it. The language instruction is "pick up the cube and put it on the plate".

    The scene is ManiSkill's ``TableSceneBuilder`` (table top at z=0, Panda base at x=-0.615), as in PickCube: it
    gives the table a real box collision, a floor and a tested robot placement, and keeps the task comparable to
    ManiSkill's own tabletop tasks. The reference uses a bare plane at z=0 with the robot base at the origin; all
    reference positions are therefore translated by the robot base offset, so the geometry relative to the robot
    is the reference's. Both objects are dynamic with the reference's physics (0.3 kg each, friction 1.0,
    restitution 0), so the robot can nudge the plate as it could the real one.

    **Randomizations:**
    - the robot's initial joint positions are the reference's (FR3_DEFAULT_CFG) plus N(0, ``robot_init_qpos_noise``)
      noise on every joint; the gripper starts fully open
    - in the robot-base frame the cube's xy is uniform in x in [0.30, 0.50], y in [0.15, 0.25] and the plate's in
      x in [0.40, 0.50], y = 0 (the reference ranges; configurable). Both sit flat on the table, axis aligned (the
      reference does not randomize yaw either)
    - unlike the reference, the cube and the plate never overlap at spawn: the cube is resampled until its
      footprint is at least ``spawn_clearance`` from the plate's

    **Success Conditions:**
    - ``success_mode="strict"`` (default): the cube's centre lies over the plate, at least ``place_margin`` inside
      its edges (in the plate's frame); the cube rests on the plate top (height within ``rest_height_tolerance``);
      the cube is nearly static; and the robot is not grasping it (it has been released)
    - ``success_mode="rlinf"``: the reference test, on actor origins: ||cube_xy - plate_xy|| < 0.07 and
      0 <= cube_z - plate_z <= 0.07. It also counts a cube still held above the plate
    - both tests are always reported in ``info`` (``success_strict``, ``success_rlinf``); the mode only picks which
      one is ``success`` and so drives termination and the sparse reward
    """

    SUPPORTED_ROBOTS = ["panda"]
    SUPPORTED_REWARD_MODES = ("normalized_dense", "dense", "sparse", "none")
    agent: Panda

    cube_half_size = 0.02
    plate_half_size = (0.08, 0.08, 0.005)
    object_mass = 0.3  # kg, both objects, as the reference sets them
    object_friction = 1.0
    place_margin = 0.02
    """How far inside the plate's edge the cube's centre must be for strict success: one cube half size, so the
    whole footprint of an axis-aligned cube is on the plate."""
    rest_height_tolerance = 0.005
    cube_static_lin_thresh = 0.01  # m/s
    cube_static_ang_thresh = 0.5  # rad/s, lenient like StackCube: contact jitter shows up as angular velocity
    rlinf_xy_thresh = 0.07
    rlinf_height_margin = 0.07
    hover_height = 0.05
    """Height of the cube's bottom above the plate top that the "carry" reward stage aims for."""
    retreat_height = 0.05
    """How far above the released cube's centre the TCP must rise for full "retreat" reward: fingertips 3 cm above
    the cube's top, clear of cube and plate."""
    num_reward_stages = 4
    max_dense_reward = 10.0
    """Dense reward of a success step; the normalized dense reward divides by it, so success pays 1."""
    max_shaping_reward = 1.0
    """Ceiling of the dense reward of every non-success step (0.1 normalized). Success terminates the episode, so a
    policy that keeps the cube next to success (on the plate but never at rest, say) collects up to
    ``max_shaping_reward / (1 - gamma)``, while succeeding collects ``max_dense_reward`` once. Success is the optimal
    behaviour only if the first is smaller: 1 vs 10 keeps it so for any gamma < 0.9. A ceiling of 8 (0.8 normalized)
    made never succeeding worth 4x success at gamma 0.8, and PPO learned exactly that."""

    def __init__(
        self,
        *args: Any,
        robot_uids: str = "panda",
        robot_init_qpos_noise: float = 0.02,
        success_mode: SuccessMode = "strict",
        sim_freq: int = 100,
        control_freq: int = 20,
        cube_spawn_center: tuple[float, float] = (0.40, 0.20),
        cube_spawn_half_range: tuple[float, float] = (0.10, 0.05),
        plate_spawn_center: tuple[float, float] = (0.45, 0.00),
        plate_spawn_half_range: tuple[float, float] = (0.05, 0.00),
        spawn_clearance: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """Store the task options first: ``BaseEnv.__init__`` builds the scene and resets, which reads them.

        Args:
            success_mode: "strict" or "rlinf"; which test ``info["success"]`` reports (see the class docstring).
            sim_freq, control_freq: physics and control rates in Hz. The defaults 100/20 (5 substeps per action)
                are ManiSkill's and run fast on CPU; the reference uses 500/10 (50 substeps, 0.1 s per action).
                A ``sim_config`` kwarg, if given, still overrides these (ManiSkill merges it over the default).
            cube_spawn_center, cube_spawn_half_range, plate_spawn_center, plate_spawn_half_range: xy spawn boxes
                in the robot-base frame, as centre +- half range (defaults: the reference's).
            spawn_clearance: minimum gap (m) between the cube's and the plate's footprints at spawn.
        """
        if success_mode not in ("strict", "rlinf"):
            raise ValueError(f"success_mode must be 'strict' or 'rlinf', got {success_mode!r}")
        if sim_freq % control_freq != 0:
            raise ValueError(f"sim_freq ({sim_freq}) must be a multiple of control_freq ({control_freq})")
        self.robot_init_qpos_noise = robot_init_qpos_noise
        self.success_mode: SuccessMode = success_mode
        self._task_sim_freq = sim_freq
        self._task_control_freq = control_freq
        self.cube_spawn_center = np.asarray(cube_spawn_center, dtype=np.float64)
        self.cube_spawn_half_range = np.asarray(cube_spawn_half_range, dtype=np.float64)
        self.plate_spawn_center = np.asarray(plate_spawn_center, dtype=np.float64)
        self.plate_spawn_half_range = np.asarray(plate_spawn_half_range, dtype=np.float64)
        self.spawn_clearance = spawn_clearance
        self._check_spawn_ranges()
        super().__init__(*args, robot_uids=robot_uids, **kwargs)

    def _check_spawn_ranges(self) -> None:
        """Fail at construction if some plate position leaves no room for the cube: resampling could never end.

        The cube box point farthest (Chebyshev) from a plate at p is, per axis, half_range + |centre - p|; the plate
        position that makes this smallest is the cube box centre clipped into the plate box, so checking it suffices.
        """
        min_gap = self.cube_half_size + self.plate_half_size[0] + self.spawn_clearance
        plate_lo = self.plate_spawn_center - self.plate_spawn_half_range
        plate_hi = self.plate_spawn_center + self.plate_spawn_half_range
        worst_plate = np.clip(self.cube_spawn_center, plate_lo, plate_hi)
        farthest = (self.cube_spawn_half_range + np.abs(self.cube_spawn_center - worst_plate)).max()
        if farthest <= min_gap:
            raise ValueError(
                f"cube spawn box {self.cube_spawn_center.tolist()} +- {self.cube_spawn_half_range.tolist()} leaves "
                f"no non-overlapping position for a plate at {worst_plate.tolist()} (need a gap of {min_gap:.3f} m)"
            )

    # ------------------------------------------------------------------ configs

    @property
    def _default_sim_config(self) -> SimConfig:
        # Contact offset and solver iterations are the reference's (fact sheet 1.2): a small contact offset keeps
        # CPU physics fast, and >= 20 position iterations keeps a 0.3 kg cube from slipping out of the grasp.
        return SimConfig(
            sim_freq=self._task_sim_freq,
            control_freq=self._task_control_freq,
            scene_config=SceneConfig(contact_offset=0.005, solver_position_iterations=25, solver_velocity_iterations=2),
        )

    @property
    def _default_sensor_configs(self) -> list[CameraConfig]:
        # The reference's calibrated camera, so the Gaussian-splat variant can render the same view later.
        width, height = REFERENCE_CAMERA_SIZE
        return [
            CameraConfig(
                "3rd_view_camera",
                _reference_camera_pose(),
                width,
                height,
                intrinsic=REFERENCE_CAMERA_INTRINSIC,
                near=0.01,
                far=100,
            )
        ]

    @property
    def _default_human_render_camera_configs(self) -> CameraConfig:
        pose = sapien_utils.look_at(eye=[0.3, 0.7, 0.6], target=[-0.2, 0.0, 0.1])
        return CameraConfig("render_camera", pose, 512, 512, 1, 0.01, 100)

    # ------------------------------------------------------------------ scene

    def _load_agent(self, options: dict) -> None:
        super()._load_agent(options, ROBOT_BASE_POSE)

    def _load_scene(self, options: dict) -> None:
        self.table_scene = TableSceneBuilder(self, robot_init_qpos_noise=self.robot_init_qpos_noise)
        self.table_scene.build()
        material = sapien.physx.PhysxMaterial(
            static_friction=self.object_friction, dynamic_friction=self.object_friction, restitution=0.0
        )
        self.cube = self._build_box(
            "cube", [self.cube_half_size] * 3, color=[0.15, 0.65, 0.2, 1.0], material=material, z=0.1
        )
        self.plate = self._build_box(
            "plate", list(self.plate_half_size), color=[0.85, 0.85, 0.8, 1.0], material=material, z=0.05
        )

    def _build_box(
        self, name: str, half_size: list[float], color: list[float], material: sapien.physx.PhysxMaterial, z: float
    ) -> Any:
        """A dynamic box whose density gives it ``object_mass``; set at build time so it holds on every backend."""
        volume = float(np.prod(np.asarray(half_size) * 2))
        builder = self.scene.create_actor_builder()
        builder.add_box_collision(
            half_size=half_size,
            material=material,
            density=self.object_mass / volume,
            patch_radius=0.1,
            min_patch_radius=0.1,
        )
        # A RenderMaterial starts SAPIEN's renderer (a Vulkan device), so state tasks built with render_backend
        # "none" add no visual: ManiSkill's own builders do the same. Without it a CPU-placed env server on a GPU
        # host (no visible GPU, the NVIDIA Vulkan driver installed) died with SIGSEGV.
        if self.scene.can_render():
            builder.add_box_visual(half_size=half_size, material=sapien.render.RenderMaterial(base_color=color))
        # Distinct initial poses keep the two boxes apart before the first episode places them.
        builder.initial_pose = sapien.Pose(p=[0.0, 0.3 if name == "cube" else -0.3, z])
        return builder.build(name=name)

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict) -> None:
        with torch.device(self.device):
            b = len(env_idx)
            self.table_scene.initialize(env_idx)
            # Replace TableSceneBuilder's "rest" arm pose with the reference's, noise drawn per env.
            rngs = [self._batched_episode_rng[int(i)] for i in env_idx.cpu().numpy()]
            qpos = np.stack([REFERENCE_INIT_QPOS + rng.normal(0, self.robot_init_qpos_noise, 9) for rng in rngs])
            qpos[:, -2:] = 0.04
            self.agent.reset(torch.as_tensor(qpos, dtype=torch.float32))
            self.agent.robot.set_pose(ROBOT_BASE_POSE)

            plate_xy, cube_xy = self._sample_object_xy(rngs)
            base = torch.as_tensor(ROBOT_BASE_POSE.p, dtype=torch.float32)
            plate_p = torch.zeros((b, 3))
            plate_p[:, :2] = torch.as_tensor(plate_xy, dtype=torch.float32) + base[:2]
            plate_p[:, 2] = self.plate_half_size[2]
            cube_p = torch.zeros((b, 3))
            cube_p[:, :2] = torch.as_tensor(cube_xy, dtype=torch.float32) + base[:2]
            cube_p[:, 2] = self.cube_half_size
            identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(b, 1)
            self.plate.set_pose(Pose.create_from_pq(plate_p, identity))
            self.cube.set_pose(Pose.create_from_pq(cube_p, identity))

    def _sample_object_xy(self, rngs: list[np.random.RandomState]) -> tuple[np.ndarray, np.ndarray]:
        """Plate then cube xy per env (robot-base frame), resampling the cube until the footprints are apart.

        Both boxes are axis aligned, so they overlap exactly when both |dx| and |dy| are below the sum of half sizes;
        the clearance is added to that sum. ``_check_spawn_ranges`` guaranteed a valid cube position exists.
        """
        min_gap = self.cube_half_size + self.plate_half_size[0] + self.spawn_clearance
        plate_xy, cube_xy = [], []
        for rng in rngs:
            plate = self.plate_spawn_center + rng.uniform(-1.0, 1.0, 2) * self.plate_spawn_half_range
            for _ in range(1000):
                cube = self.cube_spawn_center + rng.uniform(-1.0, 1.0, 2) * self.cube_spawn_half_range
                if np.abs(cube - plate).max() >= min_gap:
                    break
            else:  # practically unreachable: the valid region has positive area whenever the check passed
                raise RuntimeError(f"no non-overlapping cube position found for plate at {plate.tolist()}")
            plate_xy.append(plate)
            cube_xy.append(cube)
        return np.stack(plate_xy), np.stack(cube_xy)

    # ------------------------------------------------------------------ language

    def get_language_instruction(self) -> list[str]:
        """One instruction per parallel env (all identical), as RLinf's ``task_descriptions``."""
        return [LANGUAGE_INSTRUCTION] * self.num_envs

    def get_info(self) -> dict:
        # Strings cannot go in the (numeric) observation, so the instruction travels in info.
        info = super().get_info()
        info["language_instruction"] = self.get_language_instruction()
        return info

    # ------------------------------------------------------------------ evaluation

    @property
    def _cube_rest_height(self) -> float:
        """cube_z - plate_z when the cube lies flat on the plate: plate half height plus cube half size."""
        return self.plate_half_size[2] + self.cube_half_size

    def evaluate(self) -> dict:
        cube_pose, plate_pose = self.cube.pose, self.plate.pose
        offset = cube_pose.p - plate_pose.p
        # The plate is dynamic and can be pushed or turned, so the placement is judged in its own frame.
        cube_in_plate = quaternion_apply(quaternion_invert(plate_pose.q), offset)
        xy_limit = self.plate_half_size[0] - self.place_margin
        cube_on_plate_xy = torch.all(torch.abs(cube_in_plate[:, :2]) <= xy_limit, dim=1)
        cube_on_plate_z = torch.abs(cube_in_plate[:, 2] - self._cube_rest_height) <= self.rest_height_tolerance
        is_cube_on_plate = cube_on_plate_xy & cube_on_plate_z
        is_cube_static = self.cube.is_static(
            lin_thresh=self.cube_static_lin_thresh, ang_thresh=self.cube_static_ang_thresh
        )
        is_cube_grasped = self.agent.is_grasping(self.cube)
        success_strict = is_cube_on_plate & is_cube_static & ~is_cube_grasped

        success_rlinf = (torch.linalg.norm(offset[:, :2], dim=1) < self.rlinf_xy_thresh) & (
            (offset[:, 2] >= 0) & (offset[:, 2] <= self.rlinf_height_margin)
        )
        return {
            "success": success_strict if self.success_mode == "strict" else success_rlinf,
            "success_strict": success_strict,
            "success_rlinf": success_rlinf,
            "is_cube_grasped": is_cube_grasped,
            "cube_on_plate_xy": cube_on_plate_xy,
            "cube_on_plate_z": cube_on_plate_z,
            "is_cube_on_plate": is_cube_on_plate,
            "is_cube_static": is_cube_static,
        }

    def _get_obs_extra(self, info: dict) -> dict:
        tcp_pose = self.agent.tcp_pose
        obs = dict(tcp_pose=tcp_pose.raw_pose, is_grasped=info["is_cube_grasped"])
        # Object poses are privileged state: visual modes must infer them from pixels, as PickCube does.
        if "state" in self.obs_mode:
            cube_p, plate_p = self.cube.pose.p, self.plate.pose.p
            obs.update(
                cube_pose=self.cube.pose.raw_pose,
                plate_pose=self.plate.pose.raw_pose,
                cube_to_plate_pos=plate_p - cube_p,
                tcp_to_cube_pos=cube_p - tcp_pose.p,
            )
        return obs

    # ------------------------------------------------------------------ rewards

    def compute_dense_reward(self, obs: Any, action: torch.Tensor, info: dict) -> torch.Tensor:
        """Staged shaping in [0, ``max_shaping_reward``] before success, ``max_dense_reward`` at the success step.

        Stage scores, each stage's floor at or above the previous stage's ceiling: reach the cube [0, 1) -> grasped:
        carry it to a hover point above the plate [1, 2] -> grasped over the plate: lower it to the resting height
        [2, 3] -> resting on the plate: open the gripper, lift the hand clear of the cube, let the cube settle [3, 4].
        The score is scaled by ``max_shaping_reward / 4``; see ``max_shaping_reward`` for why success is 10x that.
        """
        cube_p, plate_p, tcp_p = self.cube.pose.p, self.plate.pose.p, self.agent.tcp_pose.p
        score = 1 - torch.tanh(5 * torch.linalg.norm(cube_p - tcp_p, dim=1))

        rest_z = plate_p[:, 2] + self._cube_rest_height
        hover = torch.cat([plate_p[:, :2], (rest_z + self.hover_height)[:, None]], dim=1)
        carry = 1 - torch.tanh(5 * torch.linalg.norm(hover - cube_p, dim=1))
        grasped = info["is_cube_grasped"]
        score = torch.where(grasped, 1 + carry, score)

        lower = 1 - torch.tanh(10 * torch.clamp(cube_p[:, 2] - rest_z, min=0))
        score = torch.where(grasped & info["cube_on_plate_xy"], 2 + lower, score)

        # Last stage: the policy trained on a reward without the retreat term let go of the cube but kept its fingers
        # on the plate, dragging plate and cube along so the cube never came to rest. Rising clear of the cube is what
        # lets it settle, so it is paid for directly; the settle scale keeps a gradient over the 1-30 rad/s of such
        # contact jitter, where StackCube's tanh(10 v + w) is already saturated.
        max_width = self.agent.robot.get_qlimits()[0, -2:, 1].sum()
        gripper_open = torch.clamp(self.agent.robot.get_qpos()[:, -2:].sum(dim=1) / max_width, 0, 1)
        ungrasp = torch.where(grasped, gripper_open, torch.ones_like(gripper_open))
        clearance = torch.clamp((tcp_p[:, 2] - cube_p[:, 2]) / self.retreat_height, 0, 1)
        retreat = torch.where(grasped, torch.zeros_like(clearance), clearance)
        lin_v = torch.linalg.norm(self.cube.linear_velocity, dim=1)
        ang_v = torch.linalg.norm(self.cube.angular_velocity, dim=1)
        settle = 1 - torch.tanh(5 * lin_v + 0.5 * ang_v)
        score = torch.where(info["is_cube_on_plate"], 3 + (ungrasp + retreat + settle) / 3, score)

        reward = score * (self.max_shaping_reward / self.num_reward_stages)
        return torch.where(info["success"], torch.full_like(reward, self.max_dense_reward), reward)

    def compute_normalized_dense_reward(self, obs: Any, action: torch.Tensor, info: dict) -> torch.Tensor:
        return self.compute_dense_reward(obs=obs, action=action, info=info) / self.max_dense_reward
