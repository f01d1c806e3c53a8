"""One typed run config for every role, loaded from YAML with dotted command-line overrides.

A run is described by one YAML file (on a cluster: one ConfigMap) that all roles read. It loads
into frozen dataclasses and is validated at start-up, so a typo or an out-of-range value fails
before any process is spawned, with an error that names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass(frozen=True)
class RunConfig:
    """What the run is called, where it writes and how long it lasts."""

    name: str = "state-ppo"
    output_dir: str = "runs"
    # Wall-clock budget of `gsrl train` in seconds; 0 = until max_updates or Ctrl-C.
    duration_s: float = 300.0
    # Stop after this many learner updates; 0 = no limit.
    max_updates: int = 0
    seed: int = 0
    log_every_s: float = 10.0
    # Where the learner writes its scalars (actor/loss, env/success_once, ...): any of tensorboard (under
    # <run dir>/tensorboard), wandb, swanlab (optional packages: pip install wandb / swanlab).
    loggers: tuple[str, ...] = ("tensorboard",)
    # Project name of the wandb and swanlab runs (the run is called run.name).
    wandb_project: str = "gsrl"
    # offline: wandb and swanlab write their run files under the run directory and never touch the network (sync
    # later with `wandb sync` / `swanlab sync`); online: they stream to their servers.
    logger_mode: str = "offline"

    def validate(self, key: str) -> None:
        _require(self.name.strip() != "", f"{key}.name", "must not be empty")
        _require(self.duration_s >= 0, f"{key}.duration_s", "must be >= 0")
        _require(self.max_updates >= 0, f"{key}.max_updates", "must be >= 0")
        _require(self.log_every_s > 0, f"{key}.log_every_s", "must be > 0")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        _require(not unknown, f"{key}.loggers", f"unknown logger(s) {unknown}; known: {LOGGERS}")
        _require(len(set(self.loggers)) == len(self.loggers), f"{key}.loggers", "lists a logger twice")
        _require(self.wandb_project.strip() != "", f"{key}.wandb_project", "must not be empty")
        _require(self.logger_mode in LOGGER_MODES, f"{key}.logger_mode", f"must be one of {LOGGER_MODES}")


LOGGERS = ("tensorboard", "wandb", "swanlab")
LOGGER_MODES = ("offline", "online")


@dataclass(frozen=True)
class RedisConfig:
    """Where the trajectory stream lives and how long it may grow."""

    host: str = "127.0.0.1"
    # 0 = pick a free port (only with start_local).
    port: int = 0
    db: int = 0
    # `gsrl train` starts its own redis-server in the run directory.
    start_local: bool = True
    key_prefix: str = "gsrl"
    stream: str = "segments"
    group: str = "learners"
    # Producers wait (back-pressure) while this many segments are unacknowledged in the stream.
    max_stream_len: int = 512
    # AUTH password ("" = none). A password in the redis URL wins. `gsrl train` sets it on its own redis-server.
    password: str = ""
    # fsync policy of the append-only file of the redis-server `gsrl train` starts: everysec keeps every
    # acknowledged segment across a clean restart and may lose the last second on a crash of Redis; always
    # keeps them across a crash too (one fsync per write).
    appendfsync: str = "everysec"

    def validate(self, key: str) -> None:
        _require(0 <= self.port <= 65535, f"{key}.port", "must be a TCP port (0-65535)")
        _require(self.appendfsync in ("always", "everysec", "no"), f"{key}.appendfsync", "must be always|everysec|no")
        _require(self.port != 0 or self.start_local, f"{key}.port", "must be set when start_local is false")
        _require(self.max_stream_len >= 1, f"{key}.max_stream_len", "must be >= 1")
        _require(self.key_prefix != "", f"{key}.key_prefix", "must not be empty")

    @property
    def stream_key(self) -> str:
        return f"{self.key_prefix}:{self.stream}"


@dataclass(frozen=True)
class RenderConfig:
    """How a Gaussian-splat task (``task.id`` ``GSEnv-...``) renders its camera images (``task.render.*``)."""

    # auto (gsplat on CUDA when present, else the PyTorch rasterizer) | gsplat | torch
    backend: str = "auto"
    # auto | cpu | cuda | cuda:N: where the Gaussians live and the renderer runs
    device: str = "auto"
    # Image size in pixels; the calibrated 640x480 camera is centre-cropped to this aspect and scaled.
    # 128x128 suits CPU runs; the VLA presets use 224x224.
    width: int = 128
    height: int = 128
    # 3rd_view_camera (the reference's calibrated camera) and optionally wrist_camera (on the hand)
    cameras: tuple[str, ...] = ("3rd_view_camera",)
    # A splat scene directory (scene.json + one PLY per body, e.g. with a fitted real scan of the table);
    # empty: built from the simulator's visual meshes and cached under cache_dir.
    scene_dir: str = ""
    cache_dir: str = "~/.cache/gsrl/splat-scenes"
    # Surface samples per square metre when converting meshes to Gaussians (objects and robot links);
    # large static surfaces (table, floor) use a fraction of it.
    samples_per_m2: float = 40000.0
    # auto: the simulator's lights shade Gaussians converted from meshes (they hold albedo), none for a scanned
    # scene_dir (a scan holds its lighting) | sim | none
    lighting: str = "auto"
    # Colour of pixels no Gaussian covers (sRGB in [0, 1]).
    background: tuple[float, ...] = (0.149, 0.165, 0.216)
    # Image-space domain randomization, drawn per env at each episode start (0 disables each one):
    # brightness: colours scaled by U(1-b, 1+b); color_jitter: per-channel gains U(1-c, 1+c);
    # camera_translation_std (m) / camera_rotation_std_deg: Gaussian noise on each camera's pose.
    brightness: float = 0.0
    color_jitter: float = 0.0
    camera_translation_std: float = 0.0
    camera_rotation_std_deg: float = 0.0

    def validate(self, key: str) -> None:
        _require(self.backend in RENDER_BACKENDS, f"{key}.backend", f"must be one of {RENDER_BACKENDS}")
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"{key}.device",
            "must be auto, cpu, cuda or cuda:N",
        )
        _require(16 <= self.width <= 4096, f"{key}.width", "must be in [16, 4096]")
        _require(16 <= self.height <= 4096, f"{key}.height", "must be in [16, 4096]")
        _require(len(self.cameras) >= 1, f"{key}.cameras", "needs at least one camera")
        unknown = [c for c in self.cameras if c not in RENDER_CAMERAS]
        _require(not unknown, f"{key}.cameras", f"unknown camera(s) {unknown}; known: {RENDER_CAMERAS}")
        _require(len(set(self.cameras)) == len(self.cameras), f"{key}.cameras", "lists a camera twice")
        _require(self.samples_per_m2 > 0, f"{key}.samples_per_m2", "must be > 0")
        _require(self.lighting in ("auto", "sim", "none"), f"{key}.lighting", "must be auto, sim or none")
        _require(
            len(self.background) == 3 and all(0.0 <= c <= 1.0 for c in self.background),
            f"{key}.background",
            "must be three numbers in [0, 1]",
        )
        for name in ("brightness", "color_jitter"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{key}.{name}", "must be in [0, 1)")
        _require(self.camera_translation_std >= 0, f"{key}.camera_translation_std", "must be >= 0")
        _require(self.camera_rotation_std_deg >= 0, f"{key}.camera_rotation_std_deg", "must be >= 0")


RENDER_BACKENDS = ("auto", "gsplat", "torch")
RENDER_CAMERAS = ("3rd_view_camera", "wrist_camera")
GS_TASK_PREFIX = "GSEnv-"
"""Task ids with this prefix are observed through the splat renderer (``gsrl.tasks.gs_env``)."""
LAYOUT_POOL_STREAM = 0x1A9_0001
"""Added to ``task.layout_pool_seed``: the pool's generator shares no seed with small seeds used elsewhere."""


@dataclass(frozen=True)
class TaskConfig:
    """The ManiSkill task every env server runs."""

    id: str = "PutCubeOnPlate-v0"
    control_mode: str = "pd_ee_target_delta_pose"
    obs_mode: str = "state"
    # sparse | dense | normalized_dense | none
    reward_mode: str = "normalized_dense"
    max_episode_steps: int = 50
    sim_freq: int = 100
    control_freq: int = 20
    # strict (cube resting on the plate, released) | rlinf (RLinf's test, for comparable curves)
    success_mode: str = "strict"
    # RLinf's use_rel_reward: each step pays the change of the task's reward since the previous step (0 before an
    # episode's first), so a state's reward is paid once, on reaching it, not on every step spent in it. An episode's
    # return telescopes to its last step's reward, and a shaped reward can no longer pay for hovering short of success
    # (gsrl.rl.reward_trap). With the sparse reward it changes nothing: success ends the episode.
    relative_reward: bool = False
    # RLinf's ignore_terminations (its evaluation setting; its training keeps False): success does not end an episode,
    # which runs to max_episode_steps. `gsrl eval --ignore-terminations` sets it and reports success at the end too.
    ignore_terminations: bool = False
    # RLinf's fixed reset states (use_fixed_reset_state_ids): 0 = every episode a new cube/plate layout; N = every
    # episode starts from one of N fixed layouts (drawn at random in training; image randomization stays fresh), as
    # the recipe trains and evaluates. `gsrl eval --layouts pool` then scores exactly those N layouts, each once; its
    # default stays held-out layouts, so a pool run's generalization is measured as well.
    layout_pool: int = 0
    # Which N layouts: the pool is a function of (layout_pool, layout_pool_seed) only, so training and eval agree.
    layout_pool_seed: int = 0
    # Used by GSEnv-* tasks only (obs_mode rgb).
    render: RenderConfig = field(default_factory=RenderConfig)

    @property
    def is_splat_rendered(self) -> bool:
        return self.id.startswith(GS_TASK_PREFIX)

    def layout_seeds(self) -> tuple[int, ...] | None:
        """The reset seeds of the ``layout_pool`` fixed layouts; None without a pool (a new layout per episode)."""
        if self.layout_pool == 0:
            return None
        draw = random.Random(LAYOUT_POOL_STREAM + self.layout_pool_seed)  # Mersenne Twister: stable across versions
        return tuple(draw.getrandbits(31) for _ in range(self.layout_pool))  # int31, like the fresh reset seeds

    def validate(self, key: str) -> None:
        _require(
            (self.obs_mode == "rgb") == self.is_splat_rendered,
            f"{key}.obs_mode",
            f"rgb (camera images + robot state) goes with a Gaussian-splat task ({GS_TASK_PREFIX}...), and a "
            f"{GS_TASK_PREFIX} task needs obs_mode rgb; got id {self.id!r} with obs_mode {self.obs_mode!r}",
        )
        self.render.validate(f"{key}.render")
        _require(self.control_mode in CONTROL_MODES, f"{key}.control_mode", f"must be one of {CONTROL_MODES}")
        _require(self.obs_mode in OBS_MODES, f"{key}.obs_mode", f"must be one of {OBS_MODES}")
        _require(self.reward_mode in REWARD_MODES, f"{key}.reward_mode", f"must be one of {REWARD_MODES}")
        _require(self.success_mode in SUCCESS_MODES, f"{key}.success_mode", f"must be one of {SUCCESS_MODES}")
        _require(self.max_episode_steps >= 1, f"{key}.max_episode_steps", "must be >= 1")
        _require(self.layout_pool >= 0, f"{key}.layout_pool", "must be >= 0 (0: a new layout every episode)")
        _require(self.layout_pool_seed >= 0, f"{key}.layout_pool_seed", "must be >= 0")
        _require(self.control_freq >= 1, f"{key}.control_freq", "must be >= 1")
        _require(
            self.sim_freq >= self.control_freq and self.sim_freq % self.control_freq == 0,
            f"{key}.sim_freq",
            f"must be a multiple of control_freq ({self.control_freq})",
        )


GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def split_addresses(value: str) -> list[str]:
    """``"a:1,b:2"`` -> ``["a:1", "b:2"]``; a gRPC target (``dns:///svc:50051``, ``ipv4:a:1,b:2``) stays whole."""
    value = value.strip()
    if value.startswith(GRPC_TARGET_SCHEMES):
        return [value]
    return [a.strip() for a in value.split(",") if a.strip()]


CONTROL_MODES = ("pd_ee_target_delta_pose", "pd_ee_delta_pose", "pd_joint_delta_pos", "pd_joint_pos")
OBS_MODES = ("state", "state_dict", "rgb")
REWARD_MODES = ("sparse", "dense", "normalized_dense", "none")
SUCCESS_MODES = ("strict", "rlinf")


@dataclass(frozen=True)
class EnvServerConfig:
    """One env server process runs `num_envs` environments and streams to one policy server."""

    num_envs: int = 4
    # Pipelined stages: the envs split into this many groups of num_envs / pipeline_stages, each on its own Rollout
    # stream, so one group steps physics (and renders) while the policy server infers for another. 1 = no pipelining.
    pipeline_stages: int = 1
    # How many env server processes `gsrl train` starts (on a cluster: the Deployment's replicas).
    num_servers: int = 2
    # One policy server "host:port", several "host:port,host:port" (tried in turn on reconnect), or a gRPC
    # target such as "dns:///gsrl-policy-server:50051" (every A record of a headless Service).
    policy_address: str = "127.0.0.1:50051"
    # First metrics port; server i uses metrics_port + i. 0 = no metrics endpoint.
    metrics_port: int = 9201
    reconnect_backoff_s: float = 1.0
    max_reconnect_backoff_s: float = 30.0
    # Episode videos of env 0 from the rendered frames (image tasks): every Nth episode, 0 = off. Written under
    # video_dir/<env server id>/ (gsrl train: <run dir>/videos/train when video_dir is empty).
    video_every_episodes: int = 0
    video_dir: str = ""
    # Draw step, reward, success and the instruction on the video frames.
    info_on_video: bool = True

    def validate(self, key: str) -> None:
        _require(self.num_envs >= 1, f"{key}.num_envs", "must be >= 1")
        _require(self.pipeline_stages >= 1, f"{key}.pipeline_stages", "must be >= 1 (1 = no pipelining)")
        _require(
            self.num_envs % self.pipeline_stages == 0,
            f"{key}.pipeline_stages",
            f"must divide {key}.num_envs ({self.num_envs}) so every stage gets the same number of envs",
        )
        _require(self.video_every_episodes >= 0, f"{key}.video_every_episodes", "must be >= 0 (0 = no videos)")
        _require(self.num_servers >= 0, f"{key}.num_servers", "must be >= 0")
        _require(
            all(":" in a for a in self.policy_addresses) and bool(self.policy_addresses),
            f"{key}.policy_address",
            "must be host:port, a comma-separated list of them, or a gRPC target like dns:///host:port",
        )
        _require(0 <= self.metrics_port <= 65535, f"{key}.metrics_port", "must be a TCP port or 0")
        _require(self.reconnect_backoff_s > 0, f"{key}.reconnect_backoff_s", "must be > 0")

    @property
    def policy_addresses(self) -> list[str]:
        return split_addresses(self.policy_address)


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy the policy servers run and the learners train."""

    # gaussian_mlp (state, or camera images through a NatureCNN) | vla (pi0.5-style flow-matching VLA)
    kind: str = "gaussian_mlp"
    hidden_sizes: tuple[int, ...] = (256, 256)
    action_chunk: int = 1
    init_log_std: float = -0.5
    obs_norm: bool = True
    # A local checkpoint to start from (model.safetensors or its directory; for the VLA also LeRobot names),
    # loaded by policy servers and learners; a learner's own resume checkpoint takes precedence.
    # vla only: size preset (tiny: CPU tests | small: one GPU | pi05: the published shapes), how the flow is made
    # stochastic for PPO (flow_sde | flow_noise), denoising steps, the SDE noise level, and whether only the
    # action expert (and heads) train in RL (`gsrl sft` always trains the whole model)
    vla_preset: str = "tiny"
    noise_method: str = "flow_sde"
    num_denoise_steps: int = 4
    noise_level: float = 0.5
    checkpoint: str = ""
    train_expert_only: bool = False
    # vla only: bfloat16 autocast on CUDA (flow arithmetic and log-probs stay float32), and torch.compile of the
    # model's passes ("" eager | default | reduce-overhead | max-autotune-no-cudagraphs), which made a `small`
    # decision 2.1-2.9x faster on an H100 (gsrl/policy/vla/compile.py)
    bf16_autocast: bool = True
    compile_mode: str = ""

    def validate(self, key: str) -> None:
        _require(self.kind in POLICY_KINDS, f"{key}.kind", f"must be one of {POLICY_KINDS}")
        _require(len(self.hidden_sizes) >= 1, f"{key}.hidden_sizes", "needs at least one layer")
        _require(all(h >= 1 for h in self.hidden_sizes), f"{key}.hidden_sizes", "sizes must be >= 1")
        _require(self.action_chunk >= 1, f"{key}.action_chunk", "must be >= 1")
        _require(self.vla_preset in ("tiny", "small", "pi05"), f"{key}.vla_preset", "must be tiny, small or pi05")
        _require(
            self.noise_method in ("flow_sde", "flow_noise"), f"{key}.noise_method", "must be flow_sde or flow_noise"
        )
        _require(self.num_denoise_steps >= 1, f"{key}.num_denoise_steps", "must be >= 1")
        _require(self.noise_level > 0, f"{key}.noise_level", "must be > 0")
        _require(
            self.compile_mode in VLA_COMPILE_MODES,
            f"{key}.compile_mode",
            f"must be one of {', '.join(repr(m) for m in VLA_COMPILE_MODES)}",
        )

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments for ``gsrl.policy.build_policy`` beyond kind/spec/dims."""
        if self.kind == "vla":
            options: dict[str, Any] = {
                "preset": self.vla_preset,
                "noise_method": self.noise_method,
                "num_denoise_steps": self.num_denoise_steps,
                "noise_level": self.noise_level,
                "train_expert_only": self.train_expert_only,
                "bf16_autocast": self.bf16_autocast,
            }
            if self.compile_mode:
                options["compile_mode"] = self.compile_mode
            if self.checkpoint:
                options["checkpoint"] = self.checkpoint
            return options
        return {"hidden_sizes": self.hidden_sizes, "init_log_std": self.init_log_std, "obs_norm": self.obs_norm}


POLICY_KINDS = ("gaussian_mlp", "vla")
# "" (eager) and gsrl.policy.vla.compile.COMPILE_MODES, repeated here so reading a config needs no torch (a test
# checks that the two agree).
VLA_COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class PolicyServerConfig:
    """Batched inference and trajectory segment assembly."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Inference batches at most this many observations (rows), waiting at most max_wait_ms to fill one.
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    # Transitions (action chunks) per trajectory segment.
    segment_length: int = 16
    metrics_port: int = 9101
    device: str = "cpu"
    num_servers: int = 1
    # Largest gRPC message either side accepts or sends (bytes); bigger ones fail with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 64 << 20

    def validate(self, key: str) -> None:
        _require(1 <= self.port <= 65535, f"{key}.port", "must be a TCP port (1-65535)")
        _require(self.max_batch_size >= 1, f"{key}.max_batch_size", "must be >= 1")
        _require(self.max_wait_ms >= 0, f"{key}.max_wait_ms", "must be >= 0")
        _require(self.segment_length >= 1, f"{key}.segment_length", "must be >= 1")
        _require(0 <= self.metrics_port <= 65535, f"{key}.metrics_port", "must be a TCP port or 0")
        _require(self.num_servers >= 1, f"{key}.num_servers", "must be >= 1")
        _require(self.max_message_bytes >= 1024, f"{key}.max_message_bytes", "must be >= 1024")


@dataclass(frozen=True)
class TLSConfig:
    """TLS on the env server <-> policy server gRPC streams (PEM files; mounted from a Secret on a cluster)."""

    enabled: bool = False
    # The server's certificate chain and private key (policy servers).
    cert_file: str = ""
    key_file: str = ""
    # CA bundle clients verify the server against ("" = the system roots).
    ca_file: str = ""
    # Name to verify in the server certificate when it differs from the dialled host ("" = the host).
    server_name: str = ""

    def validate(self, key: str) -> None:
        if not self.enabled:
            return
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            _require(path == "" or Path(path).is_file(), f"{key}.{name}", f"file not found: {path}")


@dataclass(frozen=True)
class AlgoConfig:
    """PPO hyper-parameters (names as in CleanRL / RLinf)."""

    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_ratio: float = 0.2
    # <= 0 disables value clipping.
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    lr: float = 3e-4
    # Learning rate of the critic (the value head's parameters, ``Policy.critic_parameters``); null = ``lr`` for
    # everything. pi_RL / RLinf train the VLA's value head at 1.55e-4 while the actor moves at 7.9e-6.
    critic_lr: float | None = None
    max_grad_norm: float = 1.0
    update_epochs: int = 4
    num_minibatches: int = 4
    # Samples per forward/backward pass inside a minibatch; 0 = the whole minibatch at once. The minibatch's
    # gradient is accumulated over its micro-batches before its one optimizer step: the same update in less
    # activation memory (the whole 229M-parameter `small` VLA at 512 samples ran out of an H200's 141 GB).
    micro_batch_size: int = 0
    normalize_advantages: bool = True
    # Stop the epochs early, before the optimizer step whose minibatch shows an approx_kl above it (Stable-Baselines3;
    # the first step of an update is always taken); 0 = never. With several learner ranks the KL is averaged over
    # them, so every rank stops at the same minibatch (their gradient all-reduces must pair up).
    target_kl: float = 0.0
    # Segments whose policy_version is more than this many versions behind the learner are dropped.
    max_policy_lag: int = 2
    # The first N updates train the critic alone (verl's critic_warmup): the actor's param group steps at lr 0 and the
    # loss is the value loss only, so PPO's first policy steps use advantages from a critic fitted to this task's
    # returns. Needs algo.critic_lr (the actor and critic groups). On 4 H100s the VLA's first ~40 updates, with the
    # value head explaining 30 % of the returns, took training success from about 28 % down to 15 % (tenth session).
    critic_warmup_updates: int = 0

    def validate(self, key: str) -> None:
        _require(0 < self.gamma <= 1, f"{key}.gamma", "must be in (0, 1]")
        _require(0 <= self.gae_lambda <= 1, f"{key}.gae_lambda", "must be in [0, 1]")
        _require(self.clip_ratio > 0, f"{key}.clip_ratio", "must be > 0")
        _require(self.value_coef >= 0, f"{key}.value_coef", "must be >= 0")
        _require(self.entropy_coef >= 0, f"{key}.entropy_coef", "must be >= 0")
        _require(self.lr > 0, f"{key}.lr", "must be > 0")
        _require(self.critic_lr is None or self.critic_lr > 0, f"{key}.critic_lr", "must be > 0 (or null = lr)")
        _require(self.max_grad_norm > 0, f"{key}.max_grad_norm", "must be > 0")
        _require(self.update_epochs >= 1, f"{key}.update_epochs", "must be >= 1")
        _require(self.num_minibatches >= 1, f"{key}.num_minibatches", "must be >= 1")
        _require(self.micro_batch_size >= 0, f"{key}.micro_batch_size", "must be >= 0 (0 = the whole minibatch)")
        _require(self.target_kl >= 0, f"{key}.target_kl", "must be >= 0")
        _require(self.max_policy_lag >= 0, f"{key}.max_policy_lag", "must be >= 0")
        _require(self.critic_warmup_updates >= 0, f"{key}.critic_warmup_updates", "must be >= 0 (0 = none)")
        _require(
            self.critic_warmup_updates == 0 or self.critic_lr is not None,
            f"{key}.critic_warmup_updates",
            "needs algo.critic_lr: the warm-up steps the critic's param group alone",
        )


@dataclass(frozen=True)
class LearnerConfig:
    """DeepSpeed ranks, checkpoints and the weight broadcast."""

    # DeepSpeed ranks (processes); `gsrl train` starts them with torchrun semantics.
    world_size: int = 1
    zero_stage: int = 1
    # Segments each rank consumes per update.
    segments_per_update: int = 32
    # auto = nccl with CUDA, gloo without.
    backend: str = "auto"
    device: str = "auto"
    bf16: bool = False
    # Checkpoint every N updates (0 = only when the learner stops; it always saves then).
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    resume: bool = True
    metrics_port: int = 9301
    master_port: int = 29500
    # Port of the weight-broadcast TCPStore (rank 0); 0 = pick a free one and advertise it in Redis.
    broadcast_port: int = 0
    advertise_host: str = "127.0.0.1"
    broadcast_timeout_s: float = 60.0
    # Weight broadcast to policy servers: auto = nccl when the learner is on CUDA, else gloo. Use gloo
    # when a policy server shares the learner's GPU (NCCL cannot put two ranks on one device).
    broadcast_backend: str = "auto"
    # The Redis snapshot of the weights (what a policy server that starts later loads first) at most this often;
    # 0 = at every publish. Each is the whole model, in Redis and its append-only file: a 0.9 GB VLA snapshotted at each
    # publish, every 3.3 s, helped fill a 235 GB disk in 11 minutes. The last version is snapshotted at the stop.
    snapshot_interval_s: float = 30.0
    # How long a rank waits for a full batch before logging that it is starved.
    read_block_ms: int = 2000
    # Take over stream entries pending at another consumer (a rank that died and did not come back) after
    # they sat unacknowledged this long; 0 = never. Must exceed the longest a live rank holds a batch.
    claim_idle_s: float = 300.0

    def validate(self, key: str) -> None:
        _require(self.world_size >= 1, f"{key}.world_size", "must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", "must be 0, 1, 2 or 3")
        _require(self.segments_per_update >= 1, f"{key}.segments_per_update", "must be >= 1")
        _require(self.backend in ("auto", "gloo", "nccl"), f"{key}.backend", "must be auto, gloo or nccl")
        _require(
            self.broadcast_backend in ("auto", "gloo", "nccl"), f"{key}.broadcast_backend", "must be auto, gloo or nccl"
        )
        _require(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0 (0 = only at the end)")
        _require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
        _require(0 <= self.metrics_port <= 65535, f"{key}.metrics_port", "must be a TCP port or 0")
        _require(self.broadcast_timeout_s > 0, f"{key}.broadcast_timeout_s", "must be > 0")
        _require(self.snapshot_interval_s >= 0, f"{key}.snapshot_interval_s", "must be >= 0 (0 = every publish)")
        _require(self.claim_idle_s >= 0, f"{key}.claim_idle_s", "must be >= 0 (0 = never)")


PLACEMENT_PRESETS = ("separate", "shared", "hybrid")
PLACEMENT_ROLE_KEYS = ("env_gpus", "policy_gpus", "learner_gpus")
# GPU lists that must not share a GPU under each preset: separate keeps every role apart, hybrid keeps the learners
# apart from the env and policy servers, shared co-locates everything.
PLACEMENT_DISJOINT = {
    "separate": (("env_gpus", "policy_gpus"), ("env_gpus", "learner_gpus"), ("policy_gpus", "learner_gpus")),
    "hybrid": (("env_gpus", "learner_gpus"), ("policy_gpus", "learner_gpus")),
    "shared": (),
}


@dataclass(frozen=True)
class PlacementConfig:
    """Which GPUs each role's processes use (``gsrl train``; on Kubernetes the chart's ``placement.preset`` decides).

    separate: every role on GPUs of its own; shared: env servers, policy servers and learner ranks on the same GPUs;
    hybrid: env and policy servers share GPUs, the learners have their own. Trade-offs (memory, contention, where the
    weight broadcast and the observations travel) are in docs/placement.md; the assignment is ``gsrl.placement``.
    """

    # separate | shared | hybrid
    preset: str = "separate"
    # GPUs to place processes on: the first `gpus` of those this machine shows (CUDA_VISIBLE_DEVICES honoured);
    # 0 = all of them. With none, nothing is placed and every process sees what the machine shows.
    gpus: int = 0
    # Explicit GPU indices (among those shown) per role; empty = derived from the preset and the GPU count.
    env_gpus: tuple[int, ...] = ()
    policy_gpus: tuple[int, ...] = ()
    learner_gpus: tuple[int, ...] = ()

    def validate(self, key: str) -> None:
        _require(self.preset in PLACEMENT_PRESETS, f"{key}.preset", f"must be one of {PLACEMENT_PRESETS}")
        _require(self.gpus >= 0, f"{key}.gpus", "must be >= 0 (0 = every GPU the machine shows)")
        for name in PLACEMENT_ROLE_KEYS:
            ids = getattr(self, name)
            _require(all(i >= 0 for i in ids), f"{key}.{name}", f"GPU indices must be >= 0, got {list(ids)}")
            _require(len(set(ids)) == len(ids), f"{key}.{name}", f"lists a GPU twice: {list(ids)}")
            _require(
                self.gpus == 0 or all(i < self.gpus for i in ids),
                f"{key}.{name}",
                f"GPU indices must be < {key}.gpus ({self.gpus}), got {list(ids)}",
            )
        for first, second in PLACEMENT_DISJOINT.get(self.preset, ()):
            common = sorted(set(getattr(self, first)) & set(getattr(self, second)))
            _require(
                not common,
                f"{key}.{second}",
                f"shares GPU(s) {common} with {key}.{first}, but preset {self.preset!r} keeps them apart "
                "(shared or hybrid co-locate roles)",
            )


@dataclass(frozen=True)
class Config:
    """A whole run: every role reads the section it needs."""

    run: RunConfig = field(default_factory=RunConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    env_server: EnvServerConfig = field(default_factory=EnvServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    policy_server: PolicyServerConfig = field(default_factory=PolicyServerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        algo, learner, ps = self.algo, self.learner, self.policy_server
        samples = learner.segments_per_update * ps.segment_length
        _require(
            samples >= algo.num_minibatches,
            "algo.num_minibatches",
            f"must be <= segments_per_update * segment_length ({samples})",
        )
        needed = 2 * learner.world_size * learner.segments_per_update
        _require(
            self.redis.max_stream_len >= needed,
            "redis.max_stream_len",
            f"must be >= 2 * learner.world_size * learner.segments_per_update ({needed}), or producers and "
            "learners wait on each other",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def with_overrides(self, overrides: Iterable[str]) -> Config:
        data = self.to_dict()
        for item in overrides:
            apply_override(data, item)
        return from_dict(data)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(key, f"{value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(key, f"expected null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 3e-4 and 1e5, which lack a dot or an exponent sign, as strings.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported field type {annotation}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}; valid keys: {', '.join(names)}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config; unknown keys and bad values raise ConfigError naming the key."""
    return _build(Config, data or {}, "").validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``"algo.clip_ratio=0.1"`` -> ``("algo.clip_ratio", 0.1)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(item, "override must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(item, "override has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from exc
    return key, value


def apply_override(data: dict[str, Any], item: str) -> None:
    key, value = parse_override(item)
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: depth + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML run config (or the defaults when ``path`` is None) and apply dotted overrides.

    A file may start from another with ``extends: other.yaml`` (a path relative to the file): its sections are
    merged key by key over the other's, so a variant (a 2-GPU placement, say) states only what it changes.
    """
    data = _read_config_file(Path(path), ()) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(data)


EXTENDS_KEY = "extends"


def _read_config_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One file's mapping with its ``extends`` chain resolved (``chain``: the files that extend this one)."""
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError("<file>", f"config file not found: {path}{where}")
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(EXTENDS_KEY, f"config files extend each other in a cycle: {cycle}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError("<root>", f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
    data = dict(loaded or {})
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(EXTENDS_KEY, f"{path}: must name a config file, got {parent!r}")
    base = _read_config_file(path.parent / parent, (*chain, path.resolve()))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursing into mappings present in both; lists and values are replaced whole."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def dump_config(config: Config, path: str | Path) -> None:
    """Write the effective config (defaults filled in) so a run directory says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
