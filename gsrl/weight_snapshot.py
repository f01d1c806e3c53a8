"""The latest weights as a Redis snapshot, so a policy server that starts between publishes need not wait for one.

Kept apart from the broadcast in ``gsrl.weights`` because it is a different channel with its own format and failure
modes: plain Redis reads and writes, no process group. The publisher writes it after a broadcast (or every k-th);
a subscriber reads it once, at start. The weights are safetensors bytes (no pickle), in chunks because a Redis
string holds at most 512 MiB, written in one MULTI so readers never see a torn snapshot.

Keys, alongside the broadcast's under ``{key_prefix}:weights:``: ``version`` (the latest published version, kept
current even on publishes that skip the snapshot), ``snapshot:meta`` (JSON: version, chunks, nbytes) and
``snapshot:{version}:{i}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import redis
import safetensors.torch
import torch

SNAPSHOT_CHUNK_BYTES = 256 << 20
_OLD_CHUNKS_TTL_S = 60


class _Keys:
    def __init__(self, key_prefix: str) -> None:
        base = f"{key_prefix}:weights"
        self.version = f"{base}:version"
        self.meta = f"{base}:snapshot:meta"
        self._chunk = f"{base}:snapshot:{{version}}:{{index}}"

    def chunk(self, version: int, index: int) -> str:
        return self._chunk.format(version=version, index=index)


def write_version(client: redis.Redis, key_prefix: str, version: int) -> None:
    """Record ``version`` as the latest published without writing the weights (a publish that skips the snapshot)."""
    client.set(_Keys(key_prefix).version, version)


def write_snapshot(
    client: redis.Redis,
    key_prefix: str,
    state_dict: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int = SNAPSHOT_CHUNK_BYTES,
) -> int:
    """Store the weights as safetensors bytes in one MULTI (chunks + meta + version); returns the bytes written.

    The previous version's chunks expire after a minute instead of vanishing, so a reader that fetched the old meta
    can still finish.
    """
    keys = _Keys(key_prefix)
    # copy=True: safetensors refuses tensors that share storage (tied weights, views).
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state_dict.items()}
    blob = safetensors.torch.save(cpu, metadata={"version": str(version)})
    chunks = [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]
    previous = client.get(keys.meta)
    old = json.loads(previous) if previous is not None else None
    meta = {"version": version, "chunks": len(chunks), "nbytes": len(blob)}
    with client.pipeline(transaction=True) as pipe:
        for index, chunk in enumerate(chunks):
            pipe.set(keys.chunk(version, index), chunk)
        pipe.set(keys.meta, json.dumps(meta))
        pipe.set(keys.version, version)
        if old is not None and int(old["version"]) != version:
            for index in range(int(old["chunks"])):
                pipe.expire(keys.chunk(old["version"], index), _OLD_CHUNKS_TTL_S)
        pipe.execute()
    return len(blob)


def read_snapshot(client: redis.Redis, key_prefix: str) -> tuple[dict[str, torch.Tensor], int] | None:
    """The latest snapshot as CPU tensors and its version, or None if there is none."""
    keys = _Keys(key_prefix)
    for _ in range(3):  # a publisher may replace the snapshot between our two reads; then read the new one
        raw_meta = client.get(keys.meta)
        if raw_meta is None:
            return None
        meta = json.loads(raw_meta)
        with client.pipeline(transaction=True) as pipe:
            for index in range(int(meta["chunks"])):
                pipe.get(keys.chunk(meta["version"], index))
            chunks = pipe.execute()
        if all(chunk is not None for chunk in chunks):
            return safetensors.torch.load(b"".join(chunks)), int(meta["version"])
    return None
