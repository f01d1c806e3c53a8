"""The env server's core: a batch of single ManiSkill environments stepped with action chunks, in-process.

Plain Python (no gRPC, no Redis) so it can be driven from tests and from ``server.py`` alike. ManiSkill's CPU
physics backend holds one env per instance, so the batch is a list of ``gym.make`` envs stepped one after the other;
scaling across cores is done by running more env server processes, not threads in this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import gsrl.tasks  # noqa: F401  (registers gsrl's ManiSkill tasks with gymnasium)
from gsrl.config import GS_TASK_PREFIX, RenderConfig, TaskConfig
from gsrl.env_spec import flatten_observation

ObservationSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass
class ChunkResult:
    """What one ``EnvBatch.step_chunk`` call produced, for all B envs of the batch (C = chunk length)."""

    observations: dict[str, np.ndarray]
    """[B, ...] the observation the next chunk acts on: after auto-reset for envs whose episode ended."""
    rewards: np.ndarray
    """[B] float32, sum of the rewards of the steps executed in this chunk."""
    step_rewards: np.ndarray
    """[B, C] float32, per step; 0 for the steps skipped after an episode ended inside the chunk."""
    terminated: np.ndarray
    """[B] bool, the episode ended by the task (success with ManiSkill's default); never with ignore_terminations."""
    truncated: np.ndarray
    """[B] bool, the episode hit the time limit; never True where ``terminated`` is (terminated wins)."""
    final_observations: dict[str, np.ndarray]
    """[B, ...] the last observation of the ended episode where it ended (needed to bootstrap truncated
    episodes), else equal to ``observations``."""
    episode_return: np.ndarray
    """[B] float32, undiscounted return of the ended episode; 0 where none ended."""
    episode_length: np.ndarray
    """[B] int32, env steps of the ended episode; 0 where none ended."""
    episode_success_once: np.ndarray
    """[B] bool, whether the ended episode was a success at any of its steps; False where none ended."""
    episode_success_at_end: np.ndarray
    """[B] bool, whether the ended episode was a success at its last step; False where none ended. Equal to
    ``episode_success_once`` unless the batch ignores terminations (success ends an episode otherwise)."""
    steps_executed: int
    """Env steps actually run in this call, summed over envs (< B*C when episodes ended inside the chunk)."""
    film_frames: dict[str, np.ndarray] | None = None
    """With ``EnvBatch.film_env`` set: that env's camera images [k, H, W, 3] after each of its executed steps but the
    last (whose image is in ``observations``, or ``final_observations`` if its episode ended); else None."""

    @property
    def ended(self) -> np.ndarray:
        """[B] bool, the envs whose episode ended in this chunk (and were reset)."""
        return self.terminated | self.truncated


class EnvBatch:
    """``num_envs`` envs of one task, stepped with action chunks and auto-reset when their episode ends.

    Actions come from the policy in [-1, 1]. They are clipped to [-1, 1] and mapped linearly onto the env's action
    Box [low, high] per dimension, so the policy never needs to know the controller's units. For Panda's normalized
    controllers (``pd_ee_target_delta_pose``, ``pd_ee_delta_pose``, the gripper) the Box is already [-1, 1] and
    the map is the identity; the controller itself then scales to +-0.1 m / rad per step.

    Every reset is seeded from a per-env RNG derived from ``seed``, so a batch made with the same arguments and
    driven with the same actions reproduces the same episodes. ``first_env`` makes this batch envs
    ``first_env .. first_env + num_envs - 1`` of a larger one with the same ``seed``: an env server split into
    pipelined stages (one batch per stage) seeds each env exactly as the unsplit batch would.

    ``layout_seeds`` (``TaskConfig.layout_seeds``, RLinf's fixed reset states) restricts the cube/plate layouts to
    that pool: each reset takes one at random from the env's RNG, and the image randomization a fresh seed of its
    own. ``cycle_layouts`` instead walks the pool so that the first N episodes, taken as ``gsrl eval`` takes them
    (env i's j-th episode for j < its quota), are the N pool layouts, each once: env i's j-th episode gets layout
    ``(i + j * num_envs) mod N``. Only an unsplit batch (``first_env`` 0) can cycle.

    ``task_id`` must be a gsrl task (it receives ``success_mode``); frequencies go through ManiSkill's generic
    ``sim_config`` so they override the task's defaults without touching its solver settings.

    A Gaussian-splat task (``GSEnv-<task>``, ``obs_mode="rgb"``) runs ``<task>``'s physics in each env and renders
    the camera images of all envs of the batch in one call of the splat renderer (``gsrl.tasks.gs_env``), only
    for the observations the policy reads: the one after each chunk and the final one of an ended episode, never
    the intermediate steps of a chunk.

    ``ignore_terminations`` (RLinf's evaluation setting): the task's termination (success) does not end an episode;
    it runs to the time limit, so ``episode_success_at_end`` can differ from ``episode_success_once`` (a policy that
    lifts the cube off the plate again).
    """

    def __init__(
        self,
        task_id: str,
        num_envs: int,
        *,
        control_mode: str = "pd_ee_target_delta_pose",
        obs_mode: str = "state",
        reward_mode: str = "normalized_dense",
        max_episode_steps: int = 100,
        sim_freq: int = 100,
        control_freq: int = 20,
        success_mode: str = "strict",
        relative_reward: bool = False,
        ignore_terminations: bool = False,
        seed: int = 0,
        first_env: int = 0,
        layout_seeds: Sequence[int] | None = None,
        cycle_layouts: bool = False,
        sim_backend: str = "physx_cpu",
        render: RenderConfig | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if first_env < 0:
            raise ValueError(f"first_env must be >= 0, got {first_env}")
        if layout_seeds is not None and len(layout_seeds) == 0:
            raise ValueError("layout_seeds is empty: pass None for a new layout every episode")
        if cycle_layouts and (layout_seeds is None or first_env != 0):
            raise ValueError("cycle_layouts needs layout_seeds and an unsplit batch (first_env 0)")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        splat_rendered = task_id.startswith(GS_TASK_PREFIX)
        if splat_rendered and obs_mode != "rgb":
            raise ValueError(
                f"{task_id} is observed through the splat renderer: obs_mode must be 'rgb', got {obs_mode!r}"
            )
        if not splat_rendered and obs_mode not in ("state", "state_dict"):
            raise ValueError(
                f"obs_mode must be 'state' or 'state_dict' for {task_id} (camera images come from a "
                f"{GS_TASK_PREFIX}{task_id} task with obs_mode 'rgb'), got {obs_mode!r}"
            )
        self.task_id = task_id
        self.num_envs = num_envs
        self.obs_mode = obs_mode
        self.max_episode_steps = max_episode_steps
        self._envs: list[gym.Env] = []
        self._observer: Any = None
        physics_task_id = task_id.removeprefix(GS_TASK_PREFIX)
        try:
            for _ in range(num_envs):
                self._envs.append(
                    gym.make(
                        physics_task_id,
                        num_envs=1,
                        # The splat observer reads proprioception from the state dict and renders the images itself.
                        obs_mode="state_dict" if splat_rendered else obs_mode,
                        control_mode=control_mode,
                        reward_mode=reward_mode,
                        max_episode_steps=max_episode_steps,
                        sim_backend=sim_backend,
                        # sim_config is understood by every ManiSkill task, unlike task-specific frequency kwargs.
                        sim_config=dict(sim_freq=sim_freq, control_freq=control_freq),
                        success_mode=success_mode,
                        # State tasks need no SAPIEN renderer, and an env server placed on the CPU of a GPU host
                        # (CUDA hidden, no CPU Vulkan driver) crashes creating one. The splat observer reads the
                        # scene's lights from SAPIEN's render system, so splat tasks keep it (they run on a GPU).
                        **({} if splat_rendered else {"render_backend": "none"}),
                    )
                )
            if splat_rendered:
                from gsrl.tasks.gs_env import SplatObserver  # the renderer stays unimported for state tasks

                self._observer = SplatObserver([env.unwrapped for env in self._envs], render or RenderConfig())
        except RuntimeError as exc:
            self.close()
            if not splat_rendered and "rendering device" in str(exc):
                raise RuntimeError(
                    f"{physics_task_id} asked SAPIEN for a render device although it is built with "
                    f"render_backend='none', and this process has none ({exc}). A task builds its visuals "
                    "(sapien.render.RenderMaterial, add_*_visual) only when self.scene.can_render(): creating a "
                    "render material starts SAPIEN's renderer. gsrl train hides the Vulkan drivers from env servers "
                    "placed on the CPU of a GPU host (gsrl.placement.without_vulkan_drivers)."
                ) from exc
            raise
        except BaseException:
            self.close()
            raise

        base = self._envs[0].unwrapped
        space = base.single_action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"{task_id} with control_mode={control_mode!r} has action space {space}, need a 1-D Box")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(f"action space {space} has infinite bounds; [-1, 1] actions cannot be mapped onto it")
        self.action_dim: int = int(space.shape[0])
        self._action_low = space.low.astype(np.float64)
        self._action_high = space.high.astype(np.float64)

        # The obs made by gym.make's own reset fixes keys, shapes and dtypes without spending a seeded reset.
        self.observation_spec: ObservationSpec = {
            key: (value.shape, value.dtype) for key, value in self._to_numpy_obs(base._init_raw_obs).items()
        }
        if self._observer is not None:
            self.observation_spec.update(
                {key: (shape, np.dtype(np.uint8)) for key, shape in self._observer.image_shapes.items()}
            )
        get_instruction = getattr(base, "get_language_instruction", None)
        self.instructions: list[str] = [
            env.unwrapped.get_language_instruction()[0] if get_instruction is not None else "" for env in self._envs
        ]

        # One independent stream per env: an env's reset seeds do not depend on how often the others reset. Child i
        # of the seed's SeedSequence is env i's, whichever batch (stage) holds it.
        children = np.random.SeedSequence(seed).spawn(first_env + num_envs)[first_env:]
        self._reset_rngs = [np.random.default_rng(s) for s in children]
        self._layout_seeds = None if layout_seeds is None else tuple(int(s) for s in layout_seeds)
        self._cycle_layouts = cycle_layouts
        self._resets = np.zeros(num_envs, dtype=np.int64)  # per env, for cycle_layouts
        self._last_obs: list[dict[str, np.ndarray]] | None = None
        self._episode_return = np.zeros(num_envs, dtype=np.float64)
        self._episode_length = np.zeros(num_envs, dtype=np.int32)
        self._episode_success_once = np.zeros(num_envs, dtype=bool)
        # RLinf's use_rel_reward (TaskConfig.relative_reward): each step pays the change of the task's reward.
        self.relative_reward = relative_reward
        self.ignore_terminations = ignore_terminations
        self._previous_reward = np.zeros(num_envs, dtype=np.float64)
        self.film_env: int | None = None
        """Env whose every step ``step_chunk`` also renders (``ChunkResult.film_frames``), for videos at the control
        rate; None (the default) renders only what the policy reads, once per chunk."""

    # ------------------------------------------------------------------ public API

    def reset(self) -> dict[str, np.ndarray]:
        """Start a fresh episode in every env; returns the observations, each [B, ...]."""
        self._require_open()
        self._last_obs = [self._reset_env(i) for i in range(self.num_envs)]
        self._attach_images(self._last_obs, [self._snapshot(i) for i in range(self.num_envs)])
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0
        self._episode_success_once[:] = False
        self._previous_reward[:] = 0.0
        return self._stack(self._last_obs)

    def step_chunk(self, action_chunk: np.ndarray) -> ChunkResult:
        """Run up to C steps per env from ``action_chunk`` [B, C, A] (policy scale, [-1, 1]).

        An env whose episode ends at step k < C skips its remaining k+1..C-1 actions (they were planned for a state
        that no longer exists), is reset, and reports the ended episode's statistics.
        """
        self._require_open()
        if self._last_obs is None:
            raise RuntimeError("call reset() before step_chunk()")
        actions = self._validate_and_map(action_chunk)
        num_envs, chunk_len = actions.shape[:2]
        if self.film_env is not None and not 0 <= self.film_env < num_envs:
            raise ValueError(f"film_env={self.film_env} is not an env of this batch (0..{num_envs - 1})")
        film: list[Any] = []  # film_env after each executed step: render snapshots (splat) or observations

        step_rewards = np.zeros((num_envs, chunk_len), dtype=np.float32)
        terminated = np.zeros(num_envs, dtype=bool)
        truncated = np.zeros(num_envs, dtype=bool)
        episode_return = np.zeros(num_envs, dtype=np.float32)
        episode_length = np.zeros(num_envs, dtype=np.int32)
        episode_success_once = np.zeros(num_envs, dtype=bool)
        episode_success_at_end = np.zeros(num_envs, dtype=bool)
        final_obs = list(self._last_obs)
        final_snapshots: dict[int, Any] = {}
        steps_executed = 0

        for i, env in enumerate(self._envs):
            for k in range(chunk_len):
                obs, reward, term, trunc, info = env.step(actions[i, k])
                steps_executed += 1
                reward = float(_scalar(reward))
                step_rewards[i, k] = reward - self._previous_reward[i] if self.relative_reward else reward
                self._previous_reward[i] = reward
                self._episode_return[i] += step_rewards[i, k]
                self._episode_length[i] += 1
                success = bool(_scalar(info.get("success", False)))
                self._episode_success_once[i] |= success
                self._last_obs[i] = self._to_numpy_obs(obs)
                if i == self.film_env:
                    film.append(self._last_obs[i] if self._observer is None else self._snapshot(i))
                terminated[i] = bool(_scalar(term)) and not self.ignore_terminations
                truncated[i] = bool(_scalar(trunc)) and not terminated[i]
                if terminated[i] or truncated[i]:
                    final_obs[i] = self._last_obs[i]
                    if self._observer is not None:
                        final_snapshots[i] = self._snapshot(i)  # before the reset moves everything
                    episode_return[i] = self._episode_return[i]
                    episode_length[i] = self._episode_length[i]
                    episode_success_once[i] = self._episode_success_once[i]
                    episode_success_at_end[i] = success
                    self._episode_return[i] = 0.0
                    self._episode_length[i] = 0
                    self._episode_success_once[i] = False
                    self._previous_reward[i] = 0.0
                    self._last_obs[i] = self._reset_env(i)
                    break
            if not (terminated[i] or truncated[i]):
                final_obs[i] = self._last_obs[i]

        if self._observer is not None:
            ended = sorted(final_snapshots)
            self._attach_images(
                self._last_obs + [final_obs[i] for i in ended],
                [self._snapshot(i) for i in range(num_envs)] + [final_snapshots[i] for i in ended],
            )

        return ChunkResult(
            observations=self._stack(self._last_obs),
            rewards=step_rewards.sum(axis=1, dtype=np.float32),
            step_rewards=step_rewards,
            terminated=terminated,
            truncated=truncated,
            final_observations=self._stack(final_obs),
            episode_return=episode_return,
            episode_length=episode_length,
            episode_success_once=episode_success_once,
            episode_success_at_end=episode_success_at_end,
            steps_executed=steps_executed,
            film_frames=None if self.film_env is None else self._film_frames(film[:-1]),
        )

    @classmethod
    def for_task(
        cls, task: TaskConfig, num_envs: int, seed: int, first_env: int = 0, cycle_layouts: bool = False
    ) -> EnvBatch:
        """The run's task as configured (reward, time limit, frequencies, layout pool): env servers and evaluation
        agree."""
        return cls(
            task.id,
            num_envs,
            control_mode=task.control_mode,
            obs_mode=task.obs_mode,
            reward_mode=task.reward_mode,
            max_episode_steps=task.max_episode_steps,
            sim_freq=task.sim_freq,
            control_freq=task.control_freq,
            success_mode=task.success_mode,
            relative_reward=task.relative_reward,
            ignore_terminations=task.ignore_terminations,
            seed=seed,
            first_env=first_env,
            layout_seeds=task.layout_seeds(),
            cycle_layouts=cycle_layouts,
            render=task.render,
        )

    @property
    def observer(self) -> Any:
        """The splat observer (``gsrl.tasks.gs_env.SplatObserver``) of a GSEnv task, else None."""
        return self._observer

    def close(self) -> None:
        """Close every env; safe to call twice."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.close()
        envs, self._envs = self._envs, []
        for env in envs:
            env.close()

    def __enter__(self) -> EnvBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _require_open(self) -> None:
        if not self._envs:
            raise RuntimeError("EnvBatch is closed")

    def _reset_env(self, i: int) -> dict[str, np.ndarray]:
        seed = int(self._reset_rngs[i].integers(2**31 - 1))  # the image randomization's, and the layout's if no pool
        layout = seed
        if self._layout_seeds is not None:
            pool = self._layout_seeds
            if self._cycle_layouts:
                index = int(i + self._resets[i] * self.num_envs) % len(pool)
            else:
                index = int(self._reset_rngs[i].integers(len(pool)))
            layout = pool[index]
        self._resets[i] += 1
        obs, _ = self._envs[i].reset(seed=layout)
        if self._observer is not None:
            self._observer.new_episode(i, seed)  # per-episode image randomization
        return self._to_numpy_obs(obs)

    def _snapshot(self, i: int) -> Any:
        """What the renderer needs of env ``i`` now (body and camera poses, its randomization); None for state."""
        return None if self._observer is None else self._observer.snapshot(i)

    def _film_frames(self, film: list[Any]) -> dict[str, np.ndarray]:
        """Camera images [k, H, W, 3] per key of the filmed steps: rendered in one call (splat tasks), or taken from
        the observations (ManiSkill-rendered tasks)."""
        keys = [key for key in self.observation_spec if key.startswith("rgb/")]
        if not film:
            return {key: np.zeros((0, *self.observation_spec[key][0]), dtype=np.uint8) for key in keys}
        if self._observer is not None:
            return self._observer.render(film)
        return {key: np.stack([obs[key] for obs in film]) for key in keys}

    def _attach_images(self, observations: list[dict[str, np.ndarray]], snapshots: list[Any]) -> None:
        """Render the camera images of ``snapshots`` in one batched call and add them to ``observations``."""
        if self._observer is None:
            return
        images = self._observer.render(snapshots)
        for n, obs in enumerate(observations):
            obs.update({key: frames[n] for key, frames in images.items()})

    def _validate_and_map(self, action_chunk: np.ndarray) -> np.ndarray:
        """Check [B, C, A] shape, float dtype and finiteness; clip to [-1, 1] and map onto the action Box."""
        if not isinstance(action_chunk, np.ndarray):
            raise ValueError(f"action_chunk must be a numpy array, got {type(action_chunk).__name__}")
        if not np.issubdtype(action_chunk.dtype, np.floating):
            raise ValueError(f"action_chunk dtype must be floating (float32 expected), got {action_chunk.dtype}")
        if action_chunk.ndim != 3 or action_chunk.shape[0] != self.num_envs or action_chunk.shape[2] != self.action_dim:
            raise ValueError(
                f"action_chunk shape must be [B={self.num_envs}, C, A={self.action_dim}], got {action_chunk.shape}"
            )
        if action_chunk.shape[1] < 1:
            raise ValueError(f"action_chunk must hold at least one step (C >= 1), got shape {action_chunk.shape}")
        if not np.all(np.isfinite(action_chunk)):
            bad = np.argwhere(~np.isfinite(action_chunk))[0].tolist()
            raise ValueError(f"action_chunk has non-finite values (first at [env, step, dim] = {bad})")
        return scale_actions(action_chunk, self._action_low, self._action_high)

    def _to_numpy_obs(self, obs: Any) -> dict[str, np.ndarray]:
        """ManiSkill's batch-1 torch obs -> {key: unbatched numpy array}, keyed as the policy server expects.

        For a splat task this is the proprioceptive ``state`` only; the images are attached after rendering.
        """
        flat = {key: _to_numpy(value)[0] for key, value in flatten_observation(obs).items()}
        if self._observer is not None:
            return {"state": self._observer.proprioception(flat)}
        return flat

    def _stack(self, per_env: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.stack([obs[key] for obs in per_env]) for key in per_env[0]}


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Policy actions [..., A] -> env actions: clip to [-1, 1], then map -1 -> ``low`` and +1 -> ``high`` per dim.

    Clipping first means a policy whose Gaussian samples fall outside [-1, 1] still commands a valid action, the
    bound, rather than one the controller would clip differently per mode. Returns float32.
    """
    unit = (np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0) + 1.0) / 2.0
    return (low + unit * (high - low)).astype(np.float32)


def _to_numpy(value: Any) -> np.ndarray:
    """Torch or numpy -> numpy, floats as float32 (bool and int keep their dtype)."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        array = array.astype(np.float32)
    return array


def _scalar(value: Any) -> Any:
    """ManiSkill returns batch-1 tensors for reward/terminated/truncated/info entries; take the one element."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    if isinstance(value, np.ndarray):
        return value.reshape(-1)[0].item()
    return value
