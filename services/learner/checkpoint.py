"""Learner checkpoints: model weights as safetensors, optimizer state through DeepSpeed, and a small meta file.

Layout: ``<run_dir>/checkpoints/<tag>/{model.safetensors, meta.json, deepspeed/...}``, where the tag
is ``update_000120``. ``model.safetensors`` alone is enough to serve or evaluate a policy; the
DeepSpeed part (each rank's optimizer shard) lets training resume exactly.

``meta.json`` is written last and lists the SHA-256 of every file rank 0 wrote, so a checkpoint
cut short or corrupted on disk is recognised before anything is loaded: resuming names the bad file
and falls back to the previous complete checkpoint. Only when every checkpoint is bad does the
learner refuse to start (silently starting over would discard the run's training).

Safety of what is loaded: the weights are safetensors (no code execution). DeepSpeed's own files
(optimizer state, RNG, client state) are read by DeepSpeed with ``torch.load``; they are the run's own
files on local disk, never network or Redis data, and their hashes are checked first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file

from gsrl.policy import load_model_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointMeta:
    updates: int
    policy_version: int
    saved_unix: float
    # relative path -> sha256 hex of every file in the checkpoint (older checkpoints: empty, not checked)
    files: dict[str, str] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: its message names the file and what is wrong with it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): _sha256(f) for f in sorted(path.rglob("*")) if f.is_file() and f.name != "meta.json"
    }


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
        meta = CheckpointMeta(
            updates=updates, policy_version=policy_version, saved_unix=time.time(), files=_manifest(path)
        )
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(asdict(meta), indent=2))
        tmp.replace(path / "meta.json")  # atomic: a checkpoint is complete exactly when meta.json exists
        for old in sorted(checkpoint_root(run_dir).glob("update_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved (policy version %d)", path, policy_version)
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    """The meta of checkpoint ``path``, after checking every file it lists; CheckpointError names a bad file."""
    path = Path(path)
    meta_file = path / "meta.json"
    try:
        meta = CheckpointMeta(**json.loads(meta_file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {meta_file} is unreadable or corrupted: {exc}") from exc
    for name, expected in (meta.files or {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint file {file} is corrupted (SHA-256 differs from {meta_file})")
    return meta


def load_checkpoint(path: str | Path, engine) -> CheckpointMeta:
    """Restore model and optimizer state from ``path`` into a DeepSpeed engine; returns the meta.

    Raises CheckpointError naming the file when one is missing, corrupted or does not load.
    """
    path = Path(path)
    meta = read_meta(path)
    ds_dir = path / "deepspeed"
    try:
        if ds_dir.is_dir():
            loaded, _client_state = engine.engine.load_checkpoint(str(ds_dir), tag=path.name, load_module_strict=True)
            if loaded is None:
                raise CheckpointError(f"checkpoint {ds_dir} could not be loaded by DeepSpeed")
        else:  # weights only (e.g. an SFT checkpoint): no optimizer state to restore
            engine.module.load_state_dict(load_model_weights(path))
            # ZeRO keeps its own fp32 master copy of the parameters; without a refresh, its first step
            # would write the freshly initialised weights back over the loaded ones.
            refresh = getattr(getattr(engine.engine, "optimizer", None), "refresh_fp32_params", None)
            if refresh is not None:
                refresh()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/safetensors/DeepSpeed raise many kinds on a bad file
        raise CheckpointError(f"checkpoint {path} does not load: {type(exc).__name__}: {exc}") from exc
    log.info("resumed from %s: %d updates, policy version %d", path, meta.updates, meta.policy_version)
    return meta


def resume_latest(run_dir: str | Path, engine) -> CheckpointMeta | None:
    """Load the newest usable checkpoint, falling back past bad ones (each named in an error log).

    None when the run has no checkpoint yet; CheckpointError when it has some and none of them loads.
    """
    root = checkpoint_root(run_dir)
    candidates = sorted((p for p in root.glob("update_*") if (p / "meta.json").is_file()), reverse=True)
    errors = []
    for path in candidates:
        try:
            return load_checkpoint(path, engine)
        except CheckpointError as exc:
            log.error("cannot resume from %s: %s; trying the previous checkpoint", path, exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(errors))
    return None
