"""The learner's end of the weight broadcast: ``WeightPublisher`` (rank 0) and its ``PublishStats``.

See ``gsrl.weights`` for the channel as a whole (groups, generations, the wire format and the snapshot).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
import torch
import torch.distributed as dist

from gsrl.weight_group import (
    _POLL_S,
    HEADER_MAGIC,
    _broadcast,
    _broadcast_start,
    _Group,
    _Keys,
    _new_process_group,
    _redis_now,
    _stream_ordered,
    _timedelta,
    _wait,
    _wire_device,
)
from gsrl.weight_layout import (
    WIRE_PIECE_BYTES,
    Bucket,
    BucketBuffers,
    BufferPool,
    TensorSpec,
    as_bytes,
    bucket_descriptor,
    layout_hash,
    piece_ranges,
    plan_buckets,
    tensor_layout,
)
from gsrl.weight_snapshot import (
    SnapshotResult,
    SnapshotWriter,
    encode_snapshot,
    snapshot_nbytes,
    write_snapshot_pieces,
    write_version,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- publisher


@dataclass(frozen=True)
class PublishStats:
    """``bytes`` is the payload of one broadcast (not times subscribers); ``error`` says why a broadcast was skipped.

    ``snapshot_bytes`` is the size of the snapshot this publish wrote or, in the background, queued (0: none due);
    a background snapshot's failure shows in the ``error`` of the next publish.
    """

    version: int
    num_subscribers: int
    bytes: int
    seconds: float
    rebuilt: bool
    generation: int | None = None
    snapshot_bytes: int = 0
    error: str | None = None


class WeightPublisher:
    """Learner rank 0 only. ``publish`` never raises for a subscriber's failure: it reports it and moves on.

    ``bind_host``/``port`` is where the group's TCPStore listens (port 0: a free one, see ``self.port``);
    ``advertise_host`` is how policy servers reach it (the learner pod's Service name or IP). ``gloo_hostname``
    picks the address gloo itself binds (None: gloo's default, i.e. ``GLOO_SOCKET_IFNAME`` or this host's name).
    ``device`` is where the learner's weights live: NCCL sends from it (it must be cuda), gloo through CPU buffers.
    ``subscriber_ttl_s`` must be a few of the subscribers' ``heartbeat_s``. ``snapshot_every=k`` writes the Redis
    snapshot on publishes 1, k+1, 2k+1, ... (0: never), since for a large model it costs a full CPU copy; and
    ``snapshot_interval_s`` skips any of those that come sooner than that after the last snapshot. Each snapshot is
    the whole model in Redis, and in its append-only file until a rewrite: on 4 H100s a 0.9 GB VLA snapshotted at each
    publish, every 3.3 s, helped fill a 235 GB disk in 11 minutes (docs/benchmarks.md, tenth session).
    ``snapshot_latest`` writes the newest version at the end when the interval skipped it.

    The bucket buffers persist between publishes (on the wire device: the GPU for NCCL), so a publish copies the
    weights into memory that is already mapped, and a bucket that is one contiguous tensor on the wire device goes
    out without a copy. ``snapshot_background`` (the default) writes the snapshot on a thread of its own from a
    buffer set that this publish filled and that no later publish touches until the write is done: the learner waits
    for the broadcast only, a late joiner still finds a consistent snapshot, at most the one before the newest
    publish (the latest queued snapshot wins; ``flush_snapshot`` waits for it). Up to three buffer sets may exist at
    once (broadcasting, being written, queued). Over gloo buckets travel in pieces of ``piece_bytes`` (the header says
    so), so the CPU copy of one piece overlaps the transfer of the one before. Over NCCL the copies are kernels that
    the GPU orders before each broadcast by itself: everything is posted at once and waited for once at the end, and
    ``piece_bytes`` defaults to 0 (whole buckets), since a piece only adds a collective's overhead there.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        key_prefix: str = "gsrl",
        bind_host: str = "0.0.0.0",
        advertise_host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "gloo",
        device: str | torch.device = "cpu",
        bucket_bytes: int = 64 << 20,
        timeout_s: float = 60.0,
        subscriber_ttl_s: float = 10.0,
        snapshot_every: int = 1,
        snapshot_interval_s: float = 0.0,
        gloo_hostname: str | None = None,
        snapshot_background: bool = True,
        piece_bytes: int | None = None,
    ) -> None:
        self._redis = redis_client
        self._key_prefix = key_prefix
        self._keys = _Keys(key_prefix)
        self._advertise_host = advertise_host
        self._backend = backend
        self._wire = _wire_device(backend, torch.device(device))
        self._bucket_bytes = int(bucket_bytes)
        if piece_bytes is None:
            piece_bytes = 0 if _stream_ordered(self._wire) else WIRE_PIECE_BYTES
        self._piece_bytes = int(piece_bytes)  # 0: each bucket in one broadcast
        self._timeout_s = float(timeout_s)
        self._ttl_s = float(subscriber_ttl_s)
        self._snapshot_every = int(snapshot_every)  # 0 = never
        self._snapshot_interval_s = float(snapshot_interval_s)
        self._last_snapshot_at: float | None = None  # time.monotonic() of the last snapshot taken
        self._snapshot_version: int | None = None  # the version it holds
        self._gloo_hostname = gloo_hostname
        self._group: _Group | None = None
        self._excluded: dict[str, float] = {}  # id -> Redis time until which it is left out (failed to join)
        self._last_version: int | None = None
        self._publishes = 0
        self._closed = False
        self._layout: tuple[TensorSpec, ...] | None = None  # the last published layout, its hash and bucket plan
        self._signature: list[tuple[str, torch.Size, torch.dtype]] | None = None  # what the layout was made from
        self._digest = 0
        self._buckets: tuple[Bucket, ...] = ()
        self._snapshot_sizes: dict[int, int] = {}  # digits of the version -> snapshot bytes, for this plan
        self._pool = BufferPool(max_sets=3)  # broadcasting, being snapshotted, queued for a snapshot
        self._snapshots = SnapshotWriter(redis_client, key_prefix) if snapshot_background else None
        # Our own listening socket, so bind_host is honoured (TCPStore alone binds every interface).
        listener = socket.create_server((bind_host, port), backlog=1024)
        self.port = int(listener.getsockname()[1])
        try:
            self._store = dist.TCPStore(
                bind_host,
                self.port,
                is_master=True,
                timeout=_timedelta(self._timeout_s),
                wait_for_workers=False,
                master_listen_fd=listener.fileno(),
            )
        except Exception:
            listener.close()
            raise
        listener.detach()  # the store owns the descriptor now
        logger.info(
            "weight publisher: store on %s:%d (advertised %s), backend %s",
            bind_host,
            self.port,
            advertise_host,
            backend,
        )

    @property
    def generation(self) -> int | None:
        return self._group.generation if self._group else None

    @property
    def members(self) -> tuple[str, ...]:
        """Subscriber ids in the current group, in rank order (rank 1 first)."""
        return tuple(m.rsplit("@", 1)[0] for m in self._group.members) if self._group else ()

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PublishStats:
        """Broadcast ``state_dict`` as ``version`` to the live policy servers and snapshot it to Redis.

        Blocks for the transfer; bounded by about ``timeout_s`` per failing step (join, each bucket). Versions must
        increase: subscribers ignore anything not newer than what they hold.
        """
        if self._closed:
            raise RuntimeError("publish() after close()")
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(f"version {version} is not newer than the last published {self._last_version}")
        start = time.perf_counter()
        # The same names, shapes and dtypes in the same order give the same layout; comparing them costs a quarter of
        # building the sorted layout (a millisecond for a thousand tensors, before the first byte moves).
        signature = [(name, tensor.shape, tensor.dtype) for name, tensor in state_dict.items()]
        if signature != self._signature:
            layout = tensor_layout(state_dict)
            if layout != self._layout:  # a new layout: new plan, and the pool drops the old buffers at acquire
                self._layout, self._digest = layout, layout_hash(layout)
                self._buckets = plan_buckets(layout, self._bucket_bytes)
                self._snapshot_sizes = {}
            self._signature = signature
        buckets = self._buckets
        self._publishes += 1
        snapshot_due = bool(self._snapshot_every) and (self._publishes - 1) % self._snapshot_every == 0
        if snapshot_due and self._last_snapshot_at is not None:
            snapshot_due = time.monotonic() - self._last_snapshot_at >= self._snapshot_interval_s
        # The snapshot reads the buffers after this returns (or right below), so then every bucket is copied.
        buffers = self._pool.acquire(buckets, self._wire) if snapshot_due else None
        filled = [False] * len(buckets)
        error: str | None = None
        rebuilt = False
        sent_to, payload = 0, 0
        try:
            live = self._live_members()
            if self._group is None or list(self._group.members) != live:
                self._drop_group()
                if live:
                    self._group = self._rebuild(live)
                    rebuilt = self._group is not None
                    if self._group is None:
                        error = f"could not form a broadcast group with {live}"
            if self._group is not None:
                payload = self._send(self._group, state_dict, version, buckets, buffers, filled)
                sent_to = len(self._group.members)
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL/Redis raise errors of all kinds; training goes on
            error = f"broadcast failed: {exc}"
            logger.warning("weights v%d: %s; the group is rebuilt at the next publish", version, error)
            if self._group is not None:
                self._group.broken = True
                self._drop_group()
        snapshot_bytes = 0
        try:
            write_version(self._redis, self._key_prefix, version)
            if buffers is not None:
                self._last_snapshot_at, self._snapshot_version = time.monotonic(), version
                snapshot_bytes = self._snapshot(state_dict, version, buffers, filled)
        except redis.RedisError as exc:
            error = error or f"snapshot failed: {exc}"
            logger.warning("weights v%d: snapshot to Redis failed: %s", version, exc)
        if self._snapshots is not None:
            error = error or self._snapshots.take_error()
        self._last_version = version
        return PublishStats(
            version=version,
            num_subscribers=sent_to,
            bytes=payload,
            seconds=time.perf_counter() - start,
            rebuilt=rebuilt,
            generation=self.generation,
            snapshot_bytes=snapshot_bytes,
            error=error,
        )

    def snapshot_latest(self, state_dict: Mapping[str, torch.Tensor], version: int) -> int:
        """Snapshot ``version``, the last published, if the interval skipped it; returns the bytes queued (0: none).

        For a learner that stops: ``state_dict`` must still be the weights it published as ``version``. ``close``
        then waits for the write, so the policy servers that start next get the newest weights.
        """
        if (
            self._closed
            or not self._snapshot_every
            or version != self._last_version
            or version == self._snapshot_version
            or self._layout is None
        ):
            return 0
        buffers = self._pool.acquire(self._buckets, self._wire)
        self._last_snapshot_at, self._snapshot_version = time.monotonic(), version
        return self._snapshot(state_dict, version, buffers, [False] * len(self._buckets))

    @property
    def last_snapshot(self) -> SnapshotResult | None:
        """The background snapshot finished last (its version, bytes, seconds and error); None before any."""
        return self._snapshots.last if self._snapshots is not None else None

    def flush_snapshot(self, timeout_s: float | None = None) -> bool:
        """Wait until the queued background snapshot (if any) is in Redis; False if ``timeout_s`` passed first."""
        return self._snapshots.flush(timeout_s) if self._snapshots is not None else True

    def close(self) -> None:
        """Leave the group and tell subscribers (via ``announce``) that it is gone; the store closes with us.

        The last queued snapshot is written first (up to ``timeout_s``), so a learner that stops leaves its newest
        weights for the policy servers that start next.
        """
        if self._closed:
            return
        if self._snapshots is not None and not self._snapshots.close(self._timeout_s):
            logger.warning(
                "weight publisher close: the last snapshot was still being written after %.0fs", self._timeout_s
            )
        self._drop_group()
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.group)
                pipe.set(self._keys.announce, "0:0")
                pipe.execute()
        except redis.RedisError as exc:
            logger.warning("weight publisher close: %s", exc)
        self._closed = True
        self._store = None  # type: ignore[assignment]

    def _live_members(self) -> list[str]:
        """Subscribers whose heartbeat is within the TTL, minus those recently failing to join; stale ones pruned."""
        now = _redis_now(self._redis)
        self._redis.zremrangebyscore(self._keys.subscribers, "-inf", now - self._ttl_s)
        ids = [m.decode() for m in self._redis.zrangebyscore(self._keys.subscribers, now - self._ttl_s, "+inf")]
        self._excluded = {m: until for m, until in self._excluded.items() if until > now}
        return sorted(m for m in ids if m not in self._excluded)

    def _rebuild(self, members: list[str]) -> _Group | None:
        """Form a new generation; members that do not join in time are left out for a TTL and we retry once."""
        for _ in range(2):
            try:
                group, missing = self._try_generation(members)
            except Exception as exc:  # noqa: BLE001 - a member died between join and construction
                logger.warning("weight group construction failed: %s", exc)
                return None
            if group is not None:
                return group
            until = _redis_now(self._redis) + self._ttl_s
            self._excluded.update({m: until for m in missing})
            logger.warning(
                "weight subscribers %s did not join within %.1fs; leaving them out", missing, self._timeout_s
            )
            members = [m for m in members if m not in missing]
            if not members:
                return None
        return None

    def _try_generation(self, members: list[str]) -> tuple[_Group | None, list[str]]:
        generation = int(self._redis.incr(self._keys.generation))
        info = {
            "generation": generation,
            "host": self._advertise_host,
            "port": self.port,
            "members": members,
            "backend": self._backend,
        }
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.group, json.dumps(info))
            pipe.set(self._keys.announce, f"{generation}:0")
            pipe.publish(self._keys.wake, generation)
            pipe.execute()
        store = dist.PrefixStore(self._keys.store_prefix.format(generation=generation), self._store)
        pending = set(range(1, len(members) + 1))
        deadline = time.monotonic() + self._timeout_s
        while pending and time.monotonic() < deadline:
            pending = {rank for rank in pending if not store.check([f"joined/{rank}"])}
            if pending:
                time.sleep(_POLL_S / 2)
        if pending:
            store.set("commit", "abort")
            return None, [members[rank - 1] for rank in sorted(pending)]
        store.set("commit", "go")
        pg = _new_process_group(self._backend, store, 0, len(members) + 1, self._timeout_s, self._gloo_hostname)
        logger.info("weight group generation %d: %s", generation, members)
        return _Group(generation, tuple(members), pg, store, self._wire), []

    def _send(
        self,
        group: _Group,
        state_dict: Mapping[str, torch.Tensor],
        version: int,
        buckets: Sequence[Bucket],
        buffers: BucketBuffers | None,
        filled: list[bool],
    ) -> int:
        """Announce, then header, descriptor and the buckets in pieces of at most ``piece_bytes``.

        The tensors behind piece ``k + 1`` are copied while piece ``k`` travels, and those of the first piece while the
        subscribers wake up to the announcement, so the copies hide behind transfers that the baseline pays as well.
        Over gloo the CPU does the copies, so it waits for each piece before the next; over NCCL the GPU orders them.
        """
        sequence = group.sent + 1
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.announce, f"{group.generation}:{sequence}")
            pipe.publish(self._keys.wake, sequence)
            pipe.execute()
        group.sent = sequence  # only once announced: subscribers count the same messages we do
        sources: dict[int, tuple[torch.Tensor, int]] = {}  # bucket -> (flat source, specs filled so far)
        if buffers is None:  # no snapshot reads the buffers later, so a bucket that is one tensor may skip them
            for index, bucket in enumerate(buckets):
                direct = self._as_sent(bucket, state_dict)
                if direct is not None:
                    sources[index] = (direct, len(bucket.specs))
            if len(sources) < len(buckets):  # before anything is posted, in case it has to allocate
                buffers = self._pool.acquire(buckets, self._wire)

        def ready(index: int, upto: int) -> torch.Tensor:
            """Bucket ``index``'s flat source with (at least) its first ``upto`` elements in place."""
            if index not in sources:
                assert buffers is not None
                sources[index] = (buffers.flats[index], 0)
            flat, done = sources[index]
            specs = len(buckets[index].specs)
            if done < specs:
                assert buffers is not None
                offsets = buffers.offsets[index]
                stop = done
                while stop < specs and (offsets[stop] < upto or offsets[stop] == offsets[-1]):  # or empty at the end
                    stop += 1
                buffers.fill(index, state_dict, done, stop)
                sources[index] = (flat, stop)
                filled[index] = stop == specs
            return flat

        pieces = [
            (index, start, stop)
            for index, bucket in enumerate(buckets)
            for start, stop in piece_ranges(bucket.numel, bucket.dtype.itemsize, self._piece_bytes)
        ]
        if pieces:
            ready(pieces[0][0], pieces[0][2])
        header = [
            HEADER_MAGIC, group.generation, sequence, version, len(buckets), self._digest, self._piece_bytes,
            self._bucket_bytes,
        ]  # fmt: skip
        control = [torch.tensor(header, dtype=torch.int64, device=self._wire)]
        if buckets:
            control.append(bucket_descriptor(buckets).to(self._wire))
        if _stream_ordered(self._wire):
            # NCCL runs the broadcasts in order on its stream, each after what this thread's stream had queued when it
            # was posted (its fills), so nothing needs the CPU to wait in between: post all, then wait for all. If a
            # fill fails midway the caller aborts the group, which ends the sends already posted.
            works = [_broadcast_start(group.pg, tensor, self._timeout_s) for tensor in control]
            for index, start, stop in pieces:
                works.append(_broadcast_start(group.pg, as_bytes(ready(index, stop)[start:stop]), self._timeout_s))
            for work in works:
                _wait(work, self._timeout_s, self._wire)
            return sum(bucket.nbytes for bucket in buckets)
        for tensor in control:
            _broadcast(group.pg, tensor, self._timeout_s)
        for k, (index, start, stop) in enumerate(pieces):
            flat = ready(index, stop)
            work = _broadcast_start(group.pg, as_bytes(flat[start:stop]), self._timeout_s)
            try:
                if k + 1 < len(pieces):
                    ready(pieces[k + 1][0], pieces[k + 1][2])
            finally:
                _wait(work, self._timeout_s, self._wire)  # never leave a posted send behind, even if a fill failed
        return sum(bucket.nbytes for bucket in buckets)

    def _as_sent(self, bucket: Bucket, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The tensor itself, flat, when a bucket is one contiguous tensor already on the wire device; else None."""
        if len(bucket.specs) != 1:
            return None
        tensor = state_dict[bucket.specs[0].name].detach()
        if tensor.device != self._wire or tensor.dtype != bucket.dtype or not tensor.is_contiguous():
            return None
        return tensor.reshape(-1)

    def _snapshot(
        self, state_dict: Mapping[str, torch.Tensor], version: int, buffers: BucketBuffers, filled: list[bool]
    ) -> int:
        """Snapshot this version from ``buffers`` (filling what the broadcast did not): queued, or written now."""
        for index, done in enumerate(filled):
            if not done:
                buffers.fill(index, state_dict)
        views = buffers.views()
        # The header (a JSON entry per tensor, milliseconds for a large model) differs between versions only in the
        # version's digits, so its size is worked out once per plan and number of digits.
        digits = len(str(version))
        if digits not in self._snapshot_sizes:
            self._snapshot_sizes[digits] = snapshot_nbytes(buffers.buckets, version)
        nbytes = self._snapshot_sizes[digits]
        if buffers.device.type == "cuda":  # the writer's thread reads on its own stream: the copies must be done
            torch.cuda.current_stream(buffers.device).synchronize()
        if self._snapshots is not None:
            self._snapshots.submit(version, views)
            return nbytes
        cpu = [(bucket, flat.to("cpu")) for bucket, flat in views]
        return write_snapshot_pieces(self._redis, self._key_prefix, encode_snapshot(cpu, version), version)

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
