"""Shapes of the pi0.5-layout VLA as frozen dataclasses, with three presets.

- ``tiny``: a few M parameters, for CPU unit tests (32x32 images, 3 layers).
- ``small``: about 230M parameters, trainable on one GPU (ViT-B/16 at 224, a 12-layer 768-wide LM).
- ``pi05``: the published pi0.5 shapes (PaliGemma 2B = SigLIP So400m/14 at 224 + Gemma 2B, action expert
  Gemma 300M), so a LeRobot ``pi05_base`` checkpoint loads by name (``lerobot_names``).

The LM and the action expert share one attention per layer (pi0's "mixture of experts"), so they must
agree on depth, head count, KV head count and head size; ``VLAConfig.validate`` checks that at start.
``action_dim`` / ``action_horizon`` of ``None`` mean "the env's action size / chunk length", resolved by
``VLAConfig.resolve``; pi05 keeps its model action size 32 (actions are zero-padded, as openpi does).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (``transformers.SiglipVisionConfig`` without the pooling head)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class StreamConfig:
    """One Gemma-style transformer stream (the LM or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VLAConfig:
    """Everything that fixes the model's parameter shapes, plus the flow-time embedding constants."""

    vision: VisionConfig
    language: StreamConfig
    expert: StreamConfig
    vocab_size: int
    max_token_len: int  # language tokens in the prefix (right-padded)
    action_dim: int | None = None  # model action size D >= env action size; None = env's
    action_horizon: int | None = None  # H actions generated per call >= env chunk; None = env's
    value_hidden: tuple[int, ...] = (1024, 512, 256)  # RLinf's pi0.5 value MLP after the VLM
    noise_head: bool = False  # Flow-Noise's learned std head (only built when used: no unused params)
    noise_hidden: tuple[int, ...] = (128, 64)  # RLinf ExploreNoiseNet
    noise_std_range: tuple[float, float] = (0.08, 0.16)  # std units; logvar spans log(min^2)..log(max^2)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    time_min_period: float = 4e-3
    time_max_period: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes saved with checkpoints

    def validate(self) -> VLAConfig:
        """Raise ``ValueError`` naming the offending field; returns self for chaining."""
        lm, ex = self.language, self.expert
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(lm, name) != getattr(ex, name):
                raise ValueError(
                    f"language.{name}={getattr(lm, name)} != expert.{name}={getattr(ex, name)}: "
                    "the two streams share one attention per layer"
                )
        if lm.num_heads % lm.num_kv_heads:
            raise ValueError(f"language.num_heads={lm.num_heads} is not a multiple of num_kv_heads={lm.num_kv_heads}")
        if lm.head_dim % 2:
            raise ValueError(f"language.head_dim={lm.head_dim} must be even for rotary embeddings")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"vision.image_size={self.vision.image_size} not divisible by patch_size")
        if self.vision.width % self.vision.num_heads:
            raise ValueError(f"vision.width={self.vision.width} not divisible by vision.num_heads")
        if ex.width % 2:
            raise ValueError(f"expert.width={ex.width} must be even (sin/cos time embedding)")
        lo, hi = self.noise_std_range
        if not 0 < lo <= hi:
            raise ValueError(f"noise_std_range={self.noise_std_range} must satisfy 0 < min <= max")
        if self.max_token_len < 1 or self.vocab_size < 1:
            raise ValueError("max_token_len and vocab_size must be positive")
        return self

    def resolve(self, action_dim: int, action_chunk: int) -> VLAConfig:
        """Fill ``None`` action sizes from the env and check the model covers the env's chunk [C, A]."""
        cfg = dataclasses.replace(
            self,
            action_dim=self.action_dim or action_dim,
            action_horizon=self.action_horizon or action_chunk,
        )
        assert cfg.action_dim is not None and cfg.action_horizon is not None
        if cfg.action_dim < action_dim:
            raise ValueError(f"model action_dim={cfg.action_dim} < env action_dim={action_dim}")
        if cfg.action_horizon < action_chunk:
            raise ValueError(f"model action_horizon={cfg.action_horizon} < env action_chunk={action_chunk}")
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VLAConfig keys {unknown}")
        data["vision"] = VisionConfig(**data["vision"])
        data["language"] = StreamConfig(**data["language"])
        data["expert"] = StreamConfig(**data["expert"])
        for key in ("value_hidden", "noise_hidden", "noise_std_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Byte tokenizer vocabulary: 3 specials + 256 bytes + 256 state bins (gsrl.policy.vla.tokenizer).
BYTE_VOCAB_SIZE = 3 + 256 + 256
PALIGEMMA_VOCAB_SIZE = 257152

PRESETS: dict[str, VLAConfig] = {
    "tiny": VLAConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=3, mlp_dim=256, num_heads=4),
        language=StreamConfig(width=192, depth=3, mlp_dim=768, num_heads=4, num_kv_heads=1, head_dim=48),
        expert=StreamConfig(width=96, depth=3, mlp_dim=384, num_heads=4, num_kv_heads=1, head_dim=48),
        vocab_size=BYTE_VOCAB_SIZE,
        max_token_len=96,
        value_hidden=(64, 32),
        noise_hidden=(32, 16),
    ),
    "small": VLAConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12),
        language=StreamConfig(width=768, depth=12, mlp_dim=3072, num_heads=8, num_kv_heads=1, head_dim=96),
        expert=StreamConfig(width=384, depth=12, mlp_dim=1536, num_heads=8, num_kv_heads=1, head_dim=96),
        vocab_size=BYTE_VOCAB_SIZE,
        max_token_len=160,
        value_hidden=(512, 256, 128),
    ),
    "pi05": VLAConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16),
        language=StreamConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
        expert=StreamConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
        vocab_size=PALIGEMMA_VOCAB_SIZE,
        max_token_len=200,
        action_dim=32,
        value_hidden=(1024, 512, 256),
    ),
}


def vla_config(preset: str, **overrides: Any) -> VLAConfig:
    """A preset with top-level fields replaced (``vla_config("tiny", max_token_len=64)``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VLA preset {preset!r}; known: {sorted(PRESETS)}")
    base = PRESETS[preset]
    known = {f.name for f in dataclasses.fields(VLAConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown VLAConfig override keys {unknown}; known: {sorted(known)}")
    for key in ("vision", "language", "expert"):
        if isinstance(overrides.get(key), dict):
            overrides[key] = dataclasses.replace(getattr(base, key), **overrides[key])
    return dataclasses.replace(base, **overrides).validate()
