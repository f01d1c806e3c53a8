"""Learner checkpoints: model weights as safetensors, optimizer state through DeepSpeed, and a small meta file.

Layout: ``<run_dir>/checkpoints/<tag>/{model.safetensors, meta.json, deepspeed/...}``, where the tag
is ``update_000120``. ``model.safetensors`` alone is enough to serve or evaluate a policy; the
DeepSpeed part (each rank's optimizer shard) lets training resume exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointMeta:
    updates: int
    policy_version: int
    saved_unix: float


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (its meta.json is written last), or None."""
    root = checkpoint_root(run_dir)
    complete = sorted(p for p in root.glob("update_*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def save_checkpoint(run_dir: str | Path, engine, updates: int, policy_version: int, rank: int, keep: int) -> Path:
    """Collective: every rank must call it (DeepSpeed saves each rank's optimizer shard)."""
    tag = f"update_{updates:06d}"
    path = checkpoint_root(run_dir) / tag
    path.mkdir(parents=True, exist_ok=True)
    engine.engine.save_checkpoint(str(path / "deepspeed"), tag=tag)
    if rank == 0:
        state = {k: v.detach().to("cpu").contiguous() for k, v in engine.module.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        meta = CheckpointMeta(updates=updates, policy_version=policy_version, saved_unix=time.time())
        (path / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
        for old in sorted(checkpoint_root(run_dir).glob("update_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved (policy version %d)", path, policy_version)
    return path


def load_checkpoint(path: str | Path, engine) -> CheckpointMeta:
    """Restore model and optimizer state from ``path`` into a DeepSpeed engine; returns the meta."""
    path = Path(path)
    meta = CheckpointMeta(**json.loads((path / "meta.json").read_text()))
    ds_dir = path / "deepspeed"
    if ds_dir.is_dir():
        engine.engine.load_checkpoint(str(ds_dir), tag=path.name, load_module_strict=True)
    else:
        engine.module.load_state_dict(load_model_weights(path))
    log.info("resumed from %s: %d updates, policy version %d", path, meta.updates, meta.policy_version)
    return meta


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights only (for serving or evaluation): ``path`` is a checkpoint dir or a .safetensors file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    return load_file(str(file))
