"""A scripted expert for ``PutCubeOnPlate-v0`` that reads the privileged sim state, for demonstrations (SFT data).

The reference makes its SFT demonstrations with a motion planner through fixed waypoints (pre-grasp 15 cm above the
cube, grasp, close, lift 10 cm, above the plate, descend, open, retract; fact sheet 3.7). Here the same waypoints
are tracked by a proportional controller in the task's own action space (``pd_ee_delta_pose`` or
``pd_ee_target_delta_pose``, actions in [-1, 1] that the controller scales to +-0.1 m / rad per step), so the
demonstrations are exactly the actions a policy has to produce, at the task's control rate, with no planner
dependency. A phase ends when its waypoint is reached (a distance threshold) or after a step budget, so a
waypoint the arm cannot reach exactly never stalls an episode.

Waypoints are lower than the reference's (8 cm pre-grasp, 6 cm carry height): the RL task gives an episode 50
steps at 20 Hz, and every centimetre travelled costs steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mani_skill.utils.geometry.rotation_conversions import matrix_to_axis_angle, quaternion_to_matrix

EXPERT_CONTROL_MODES = ("pd_ee_delta_pose", "pd_ee_target_delta_pose")

TCP_DOWN_QUAT = (0.0, 1.0, 0.0, 0.0)
"""TCP orientation (wxyz, world frame) that points the gripper straight down with the fingers closing along the
world y axis: the reference start pose's, and one that fits the cube, which is spawned axis aligned (no yaw)."""


class Phase(enum.IntEnum):
    REACH = 0
    DESCEND = 1
    CLOSE = 2
    LIFT = 3
    CARRY = 4
    LOWER = 5
    OPEN = 6
    RETRACT = 7


@dataclass(frozen=True)
class ExpertConfig:
    """Gains, waypoints and budgets of the scripted expert (metres, steps of the task's control rate)."""

    pregrasp_height: float = 0.08
    """TCP height above the cube centre at the end of REACH."""
    grasp_depth: float = 0.0
    """TCP height above the cube centre when the gripper closes (0: fingertips around the cube's middle)."""
    carry_height: float = 0.06
    """Height of the cube's bottom above the plate top while carrying."""
    place_clearance: float = 0.004
    """Height of the cube's bottom above the plate top when the gripper opens: a short drop, so it lands flat."""
    retract_height: float = 0.08
    """How far the TCP rises after release."""
    pos_gain: float = 1.5
    """Proportional gain: action = gain * error / 0.1 m (the controller's full-scale step)."""
    rot_gain: float = 1.0
    target_pos_gain: float = 0.7
    """Gain for ``pd_ee_target_delta_pose``, whose deltas move the controller's target at once (no lag to make up
    for): a gain above 1 there overshoots every step."""
    max_action: float = 1.0
    """Cap on the translational action (1.0 = 0.1 m per step requested)."""
    reach_tolerance: float = 0.015
    grasp_tolerance: float = 0.006
    carry_tolerance: float = 0.012
    place_tolerance: float = 0.006
    close_steps: int = 4
    open_steps: int = 3
    phase_step_budget: int = 15
    """Steps after which a moving phase gives up on its tolerance and moves on."""
    noise_std: float = 0.0
    """Std of Gaussian noise added to every action dimension but the gripper (then clipped to [-1, 1]) in the
    *executed* action only (``ExpertAction.executed``): DART (Laskey et al. 2017) runs the perturbed action to visit
    states off the clean path, and labels each state with the clean ``ExpertAction.expert``, so a policy learns to
    recover from perturbations without learning the noise."""


@dataclass(frozen=True)
class ExpertAction:
    """One step of the expert: the action to label the state with, and the action to run in the env.

    Both are normalized float32 [7] in [-1, 1] (xyz, rotation, gripper; gripper +1 open, -1 closed); ``executed``
    is ``expert`` plus ``noise_std`` Gaussian noise on the six arm dimensions, clipped (the gripper is never noised),
    and the same array values as ``expert`` when ``noise_std`` is 0.
    """

    expert: np.ndarray
    """The clean action for the current state: the demonstration's label (DART)."""
    executed: np.ndarray
    """The action to pass to ``env.step``."""


class PutCubeOnPlateExpert:
    """Waypoint-tracking expert for one single-env ``PutCubeOnPlate-v0`` simulation.

    Call ``reset()`` at the start of every episode, then ``act(env)`` once per step with the env (or its
    ``unwrapped``): it returns an ``ExpertAction``, whose ``executed`` goes to ``env.step`` and whose ``expert`` is
    the clean label to record (they differ only with ``noise_std`` > 0).
    """

    def __init__(self, config: ExpertConfig | None = None, seed: int = 0) -> None:
        self.config = config or ExpertConfig()
        self.rng = np.random.default_rng(seed)
        self._target_rot = quaternion_to_matrix(torch.tensor(TCP_DOWN_QUAT, dtype=torch.float64))
        self.reset()

    def reset(self) -> None:
        self.phase = Phase.REACH
        self.phase_steps = 0
        self._grasp_offset: np.ndarray | None = None
        self._release_tcp: np.ndarray | None = None

    def act(self, env: Any) -> ExpertAction:
        """The clean and the executed action for the env's current state; advances the phase machine."""
        u = env.unwrapped
        tcp = u.agent.tcp_pose.p[0].double().cpu().numpy()
        cube = u.cube.pose.p[0].double().cpu().numpy()
        plate = u.plate.pose.p[0].double().cpu().numpy()
        cfg = self.config
        # With a target controller the deltas add to the controller's running target, not to the measured pose:
        # errors are taken from that target, or the lag between them would be integrated into overshoot.
        reference, gain = u.agent.tcp_pose, cfg.pos_gain
        arm = getattr(u.agent.controller, "controllers", {}).get("arm")
        if arm is not None and getattr(arm.config, "use_target", False) and arm._target_pose is not None:
            reference, gain = u.agent.robot.pose * arm._target_pose, cfg.target_pos_gain
        ref_p = reference.p[0].double().cpu().numpy()
        ref_rot = quaternion_to_matrix(reference.q[0].double().cpu())
        cube_half = float(u.cube_half_size)
        plate_top = plate[2] + float(u.plate_half_size[2])

        self._advance(tcp, cube, plate_top, plate, cube_half, bool(u.agent.is_grasping(u.cube)[0]))

        gripper = 1.0
        if self.phase in (Phase.REACH, Phase.DESCEND):
            height = cfg.pregrasp_height if self.phase == Phase.REACH else cfg.grasp_depth
            if self.phase == Phase.REACH and np.linalg.norm(tcp[:2] - cube[:2]) < 0.02:
                height = max(cfg.grasp_depth, min(height, tcp[2] - cube[2] - 0.03))
            target = cube + np.array([0.0, 0.0, height])
        elif self.phase == Phase.CLOSE:
            target, gripper = cube + np.array([0.0, 0.0, cfg.grasp_depth]), -1.0
        elif self.phase in (Phase.LIFT, Phase.CARRY, Phase.LOWER):
            gripper = -1.0
            assert self._grasp_offset is not None
            # Track where the cube should go, moving the TCP by the cube's own error: the grasp need not be centred.
            if self.phase == Phase.LOWER:
                cube_target = np.array([plate[0], plate[1], plate_top + cube_half + cfg.place_clearance])
            else:
                cube_target = np.array([cube[0], cube[1], plate_top + cube_half + cfg.carry_height])
                if self.phase == Phase.CARRY:
                    cube_target[:2] = plate[:2]
            target = tcp + (cube_target - cube)
        elif self.phase == Phase.OPEN:
            assert self._release_tcp is not None
            target = self._release_tcp
        else:  # RETRACT
            assert self._release_tcp is not None
            target = self._release_tcp + np.array([0.0, 0.0, cfg.retract_height])

        action = np.zeros(7)
        action[:3] = np.clip(gain * (target - ref_p) / 0.1, -cfg.max_action, cfg.max_action)
        # The controller composes the rotation delta on the left, in world-aligned axes, but turns the TCP by the
        # *inverse* of the commanded rotation vector (measured: commanding log(R_target R_now^T) diverges, its
        # negative converges within a few steps), so the command is log(R_now R_target^T).
        rot_error = matrix_to_axis_angle(ref_rot @ self._target_rot.T).numpy()
        action[3:6] = np.clip(cfg.rot_gain * rot_error / 0.1, -1.0, 1.0)
        action[6] = gripper
        clean = np.clip(action, -1.0, 1.0).astype(np.float32)
        executed = clean.copy()
        if cfg.noise_std > 0:
            executed[:6] = np.clip(clean[:6] + self.rng.normal(0.0, cfg.noise_std, 6), -1.0, 1.0)
        self.phase_steps += 1
        return ExpertAction(expert=clean, executed=executed)

    def _advance(
        self, tcp: np.ndarray, cube: np.ndarray, plate_top: float, plate: np.ndarray, cube_half: float, grasped: bool
    ) -> None:
        """Switch phase when the current one's waypoint is reached or its step budget is spent."""
        cfg = self.config
        over_budget = self.phase_steps >= cfg.phase_step_budget
        phase = self.phase
        if phase == Phase.REACH:
            done = np.linalg.norm(tcp - (cube + [0, 0, cfg.pregrasp_height])) < cfg.reach_tolerance
            # Close enough above the cube: skip the rest of the pre-grasp height to save steps.
            done = done or (np.linalg.norm(tcp[:2] - cube[:2]) < 0.008 and tcp[2] - cube[2] < cfg.pregrasp_height)
            self._switch_if(done or over_budget, Phase.DESCEND)
        elif phase == Phase.DESCEND:
            done = np.linalg.norm(tcp - (cube + [0, 0, cfg.grasp_depth])) < cfg.grasp_tolerance
            self._switch_if(done or over_budget, Phase.CLOSE)
        elif phase == Phase.CLOSE:
            if self.phase_steps >= cfg.close_steps:
                if grasped:
                    self._grasp_offset = tcp - cube
                    self._switch_if(True, Phase.LIFT)
                elif self.phase_steps >= cfg.close_steps + 4:  # missed: open and try again from above
                    self._switch_if(True, Phase.REACH)
        elif phase in (Phase.LIFT, Phase.CARRY, Phase.LOWER) and not grasped:
            self._switch_if(True, Phase.REACH)  # dropped it: pick it up again
        elif phase == Phase.LIFT:
            done = cube[2] - cube_half - plate_top > cfg.carry_height - cfg.carry_tolerance
            self._switch_if(done or over_budget, Phase.CARRY)
        elif phase == Phase.CARRY:
            done = np.linalg.norm(cube[:2] - plate[:2]) < cfg.carry_tolerance
            self._switch_if(done or over_budget, Phase.LOWER)
        elif phase == Phase.LOWER:
            goal = np.array([plate[0], plate[1], plate_top + cube_half + cfg.place_clearance])
            done = np.linalg.norm(cube - goal) < cfg.place_tolerance
            if done or over_budget:
                self._release_tcp = tcp.copy()
                self._switch_if(True, Phase.OPEN)
        elif phase == Phase.OPEN:
            self._switch_if(self.phase_steps >= cfg.open_steps, Phase.RETRACT)

    def _switch_if(self, condition: bool, phase: Phase) -> None:
        if condition:
            self.phase = phase
            self.phase_steps = 0
