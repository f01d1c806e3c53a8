"""A checkpoint's weight files: one ``model.safetensors``, or Hugging Face-style shards with an index.

Why shards: a checkpoint has to pass through places with a size limit per file (a transfer tool, an object store's
single-part upload, a git-annex remote), and Hugging Face's layout is the one its users' tools already read::

    model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    model.safetensors.index.json    {"metadata": {"total_size": BYTES}, "weight_map": {tensor name: shard file}}

Every role reads weights through ``load_weights`` (by way of ``gsrl.policy.load_model_weights``), so a directory
holding either layout serves, evaluates, resumes and fine-tunes the same way. ``gsrl export`` writes shards.
Safetensors throughout: loading runs no code.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model-*-of-*.safetensors"


def is_weights_file(name: str) -> bool:
    """Whether ``name`` is one of a checkpoint's weight files (the single file, a shard, or the shard index)."""
    return name in (WEIGHTS_FILE, SHARD_INDEX) or fnmatch.fnmatchcase(name, SHARD_PATTERN)


def resolve_weights(path: str | Path) -> Path:
    """The weights a checkpoint path names: the path itself if it is a file (``.safetensors`` or a shard index),
    else the directory's ``model.safetensors`` or, failing that, its shard index. FileNotFoundError names the path.
    """
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_FILE, SHARD_INDEX):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"checkpoint not found: checkpoint directory {path} has no {WEIGHTS_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} does not exist")
    return path


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict a checkpoint path names (see ``resolve_weights``), every shard's tensors merged.

    A shard index whose shards are missing, or whose shards hold other tensors than it lists, is an error naming
    them, never a partial state dict (a strict load would then blame the model instead).
    """
    from safetensors.torch import load_file

    file = resolve_weights(path)
    if not file.name.endswith(".index.json"):
        return load_file(str(file))
    try:
        weight_map: dict[str, str] = json.loads(file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file} is not a safetensors shard index (no weight_map): {exc}") from exc
    listed_in: dict[str, set[str]] = {}  # shard file -> the tensors the index puts in it
    for key, shard in weight_map.items():
        listed_in.setdefault(shard, set()).add(key)
    missing = [name for name in sorted(listed_in) if not (file.parent / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{file} lists shards that are not in {file.parent}: {', '.join(missing)}")
    state: dict[str, Tensor] = {}
    for name, listed in sorted(listed_in.items()):
        part = load_file(str(file.parent / name))
        if set(part) != listed:
            extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
            raise ValueError(f"{file.parent / name} does not match {file.name}: unlisted {extra}, absent {absent}")
        state.update(part)
    return state


def save_sharded(state: Mapping[str, Tensor], directory: str | Path, max_shard_bytes: int) -> list[Path]:
    """Write ``state`` into ``directory`` as shards of at most ``max_shard_bytes`` of tensor data each (a single
    tensor larger than that gets a shard of its own), plus the index; one shard is written as ``model.safetensors``
    with no index. Returns the files written. Refuses a directory that already holds weights, so two exports never
    mix.
    """
    from safetensors.torch import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    directory = Path(directory)
    existing = sorted(p.name for p in directory.iterdir() if is_weights_file(p.name)) if directory.is_dir() else []
    if existing:
        raise FileExistsError(f"{directory} already holds weights ({', '.join(existing)}): export into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, Tensor]] = [{}]
    filled = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append({})
            filled = 0
        groups[-1][key] = tensor.detach().contiguous().cpu()
        filled += size
    if len(groups) == 1:
        save_file(groups[0], str(directory / WEIGHTS_FILE))
        return [directory / WEIGHTS_FILE]
    written, weight_map, total = [], {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(directory / name))
        written.append(directory / name)
        weight_map.update(dict.fromkeys(group, name))
        total += sum(t.numel() * t.element_size() for t in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, directory / SHARD_INDEX]
