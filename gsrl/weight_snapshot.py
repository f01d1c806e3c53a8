"""The latest weights as a Redis snapshot, so a policy server that starts between publishes need not wait for one.

Kept apart from the broadcast in ``gsrl.weights`` because it is a different channel with its own format and failure
modes: plain Redis reads and writes, no process group. The publisher writes it after a broadcast (or every k-th);
a subscriber reads it once, at start. The weights are safetensors bytes (no pickle), in chunks because a Redis
string holds at most 512 MiB, written in one MULTI so readers never see a torn snapshot.

The bytes are assembled here rather than by ``safetensors.torch.save``: the header is a few hundred bytes of JSON and
the data is the flat weight buffers themselves, so a 64 MiB snapshot costs no serialization copy, only the transfer
to Redis. ``SnapshotWriter`` does that transfer on a thread of its own, so the learner does not wait for it.

Keys, alongside the broadcast's under ``{key_prefix}:weights:``: ``version`` (the latest published version, kept
current even on publishes that skip the snapshot), ``snapshot:meta`` (JSON: version, chunks, nbytes) and
``snapshot:{version}:{i}``.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
import safetensors.torch
import torch

from gsrl.weight_layout import Bucket, flatten_bucket, plan_buckets, tensor_layout

logger = logging.getLogger(__name__)

SNAPSHOT_CHUNK_BYTES = 256 << 20
_OLD_CHUNKS_TTL_S = 60
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class _Keys:
    def __init__(self, key_prefix: str) -> None:
        base = f"{key_prefix}:weights"
        self.version = f"{base}:version"
        self.meta = f"{base}:snapshot:meta"
        self._chunk = f"{base}:snapshot:{{version}}:{{index}}"

    def chunk(self, version: int, index: int) -> str:
        return self._chunk.format(version=version, index=index)


Pieces = list[bytes | memoryview]


def encode_snapshot(
    buckets: Sequence[tuple[Bucket, torch.Tensor]], version: int, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES
) -> Pieces:
    """Safetensors bytes as pieces of at most ``chunk_bytes``: the header, then slices of each flat CPU buffer.

    Buckets go in descending item size, so every tensor starts aligned to its dtype (safetensors' own order) without
    padding. The data pieces are views of the buffers, not copies: they are valid while the buffers are unchanged.
    """
    ordered = sorted(buckets, key=lambda item: -item[0].dtype.itemsize)  # stable: plan order within an item size
    pieces: Pieces = [_header([bucket for bucket, _flat in ordered], version)]
    for bucket, flat in ordered:
        if flat.device.type != "cpu" or not flat.is_contiguous() or flat.numel() != bucket.numel:
            raise ValueError(f"snapshot buffers must be flat contiguous CPU tensors, got {flat.device}/{flat.shape}")
        data = memoryview(flat.view(torch.uint8).numpy())
        pieces.extend(data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes))
    return pieces


def _header(ordered: Sequence[Bucket], version: int) -> bytes:
    """The safetensors length prefix and JSON header for ``ordered`` buckets' tensors laid out back to back."""
    header: dict[str, dict] = {"__metadata__": {"version": str(version)}}
    offset = 0
    for bucket in ordered:
        for spec in bucket.specs:
            header[spec.name] = {
                "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def snapshot_nbytes(buckets: Sequence[Bucket], version: int) -> int:
    """What ``encode_snapshot`` of these buckets will come to, without touching any tensor."""
    ordered = sorted(buckets, key=lambda bucket: -bucket.dtype.itemsize)
    return len(_header(ordered, version)) + sum(bucket.nbytes for bucket in ordered)


def write_version(client: redis.Redis, key_prefix: str, version: int) -> None:
    """Record ``version`` as the latest published without writing the weights (a publish that skips the snapshot)."""
    client.set(_Keys(key_prefix).version, version)


def write_snapshot_pieces(
    client: redis.Redis, key_prefix: str, pieces: Pieces, version: int, *, set_version: bool = True
) -> int:
    """Store ``pieces`` (``encode_snapshot``) as the snapshot of ``version`` in one MULTI; returns the bytes written.

    ``set_version=False`` leaves the ``version`` key alone: a background writer finishes after later publishes have
    already recorded newer versions, which must not go backwards. The previous version's chunks expire after a minute
    instead of vanishing, so a reader that fetched the old meta can still finish.
    """
    keys = _Keys(key_prefix)
    pieces = [piece for piece in pieces if len(piece)] or [b""]
    nbytes = sum(len(piece) for piece in pieces)
    previous = client.get(keys.meta)
    old = json.loads(previous) if previous is not None else None
    meta = {"version": version, "chunks": len(pieces), "nbytes": nbytes}
    with client.pipeline(transaction=True) as pipe:
        for index, piece in enumerate(pieces):
            pipe.set(keys.chunk(version, index), piece)
        pipe.set(keys.meta, json.dumps(meta))
        if set_version:
            pipe.set(keys.version, version)
        if old is not None and int(old["version"]) != version:
            for index in range(int(old["chunks"])):
                pipe.expire(keys.chunk(old["version"], index), _OLD_CHUNKS_TTL_S)
        pipe.execute()
    return nbytes


def write_snapshot(
    client: redis.Redis,
    key_prefix: str,
    state_dict: Mapping[str, torch.Tensor],
    version: int,
    chunk_bytes: int = SNAPSHOT_CHUNK_BYTES,
) -> int:
    """Store the weights as safetensors bytes in one MULTI (chunks + meta + version); returns the bytes written.

    Copies ``state_dict`` to the CPU first (flat buffers of at most ``chunk_bytes``), so it may keep changing once
    this returns; the publisher instead hands ``write_snapshot_pieces`` the buffers it has already filled.
    """
    buckets = plan_buckets(tensor_layout(state_dict), chunk_bytes)
    flats = [(b, flatten_bucket(b, state_dict, torch.device("cpu"))) for b in buckets]
    return write_snapshot_pieces(client, key_prefix, encode_snapshot(flats, version, chunk_bytes), version)


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


# ---------------------------------------------------------------- background writer


def _to_host(buckets: Sequence[tuple[Bucket, torch.Tensor]]) -> list[tuple[Bucket, torch.Tensor]]:
    """CPU copies of the buffers; those on a GPU are read on a side stream of their own.

    On this thread's current stream (the device's default stream) a copy of a large model, tens of milliseconds, would
    sit in the stream that the learner's own kernels use and hold them up. The buffers are complete when they are
    submitted (the publisher synchronized the stream that filled them), so the side stream needs to wait for nothing.
    It comes from torch's high-priority pool because the weight group's NCCL stream comes from the other pool
    (``is_high_priority_stream = False``): a pool hands its streams out in turn, and sharing one with the broadcast
    would queue the next publish behind this copy. Priority does not matter to a copy.
    """
    streams: dict[torch.device, torch.cuda.Stream] = {}
    out: list[tuple[Bucket, torch.Tensor]] = []
    for bucket, flat in buckets:
        if flat.device.type != "cuda":
            out.append((bucket, flat.to("cpu")))
            continue
        if flat.device not in streams:
            streams[flat.device] = torch.cuda.Stream(flat.device, priority=-1)
        with torch.cuda.stream(streams[flat.device]):
            out.append((bucket, flat.to("cpu")))  # pageable memory: returns once the copy is done
    return out


@dataclass(frozen=True)
class SnapshotResult:
    """One finished (or failed) background snapshot; ``error`` is None on success."""

    version: int
    nbytes: int
    seconds: float
    error: str | None = None


@dataclass
class _Job:
    version: int
    buckets: list[tuple[Bucket, torch.Tensor]]  # views of the publisher's buffers: they stay untouched while held


class SnapshotWriter:
    """Writes snapshots on one daemon thread: never two at once, and the latest submitted wins.

    A full snapshot of a large model takes longer than a broadcast (hundreds of ms per 64 MiB into Redis on a small
    host), and the learner would wait for it every update. Here ``submit`` only parks the job; a job still waiting
    when a newer one comes is dropped (its buffers released), since a late joiner wants the newest weights, not every
    version. The job's buffers are views that the publisher does not refill while they are held (``BufferPool``), so
    each snapshot is one consistent version. ``version`` in Redis is the publisher's to advance; this writer only
    replaces the snapshot, so a slow write never moves it back.
    """

    def __init__(self, client: redis.Redis, key_prefix: str, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES) -> None:
        self._client = client
        self._key_prefix = key_prefix
        self._chunk_bytes = chunk_bytes
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._writing: int | None = None  # version being written
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = 0  # jobs superseded before they started
        self.last: SnapshotResult | None = None  # the most recent write, successful or not
        self.last_written: SnapshotResult | None = None  # the most recent successful write
        self._unreported_error: str | None = None

    def submit(self, version: int, buckets: list[tuple[Bucket, torch.Tensor]]) -> None:
        """Queue ``buckets`` (flat views, any device) as the snapshot of ``version``, replacing a job not yet begun."""
        with self._cond:
            if self._closed:
                raise RuntimeError("SnapshotWriter.submit() after close()")
            if self._pending is not None:
                self.dropped += 1
                logger.debug("weights snapshot v%d superseded by v%d", self._pending.version, version)
            self._pending = _Job(version, buckets)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="weights-snapshot", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take_error(self) -> str | None:
        """A failure not yet reported (once): the publisher puts it in the next ``PublishStats.error``."""
        with self._cond:
            error, self._unreported_error = self._unreported_error, None
            return error

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is queued or being written; False if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._writing is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish what is queued (up to ``timeout_s``), then stop the thread; False if a write was still going."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._pending = None  # when the flush timed out: give up the queued job, not the one being written
            self._cond.notify_all()
        return flushed

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._writing = job.version
            result = self._write(job)
            del job  # release the buffers before saying we are done, so the publisher can reuse them at once
            with self._cond:
                self.last = result
                if result.error is None:
                    self.last_written = result
                else:
                    self._unreported_error = result.error
                self._writing = None
                self._cond.notify_all()

    def _write(self, job: _Job) -> SnapshotResult:
        start = time.perf_counter()
        try:
            # A device buffer comes to the CPU here, off the learner's thread; the device views go right after.
            cpu = _to_host(job.buckets)
            job.buckets = []
            pieces = encode_snapshot(cpu, job.version, self._chunk_bytes)
            nbytes = write_snapshot_pieces(self._client, self._key_prefix, pieces, job.version, set_version=False)
        except Exception as exc:  # noqa: BLE001 - Redis, memory, a closed client: report and keep serving
            logger.warning("weights snapshot v%d failed: %s", job.version, exc)
            return SnapshotResult(job.version, 0, time.perf_counter() - start, f"snapshot failed: {exc}")
        return SnapshotResult(job.version, nbytes, time.perf_counter() - start)
