"""Versioned weight broadcast from learner rank 0 to the policy servers: the publisher and subscriber ends.

This module is the live channel: who is in the broadcast group, when it is rebuilt, and how each publish travels.
The group protocol both ends share (process-group construction, wire header, Redis control keys and what they
mean) lives in ``gsrl.weight_group``; what the bytes look like (layout, hash, buckets) in ``gsrl.weight_layout``;
the Redis snapshot that a policy server loads at start in ``gsrl.weight_snapshot``.

A publish reads the live set; if it differs from the group's members the publisher moves to a new generation
(two-phase: each member sets ``joined/{rank}`` in the store, then the publisher sets ``commit`` to ``go`` or
``abort``), so a member that died but still looks live costs at most ``timeout_s`` and is left out, never a hang.
Each message is a header (int64), a bucket descriptor, then the buckets (see ``gsrl.weight_layout``). The
subscriber checks the layout hash against its template and refuses a mismatch (it still receives the bytes, so the
group stays in step).

NCCL: by default PyTorch tears the process down when a NCCL collective times out
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``); entry points that use ``backend="nccl"`` should set it to ``2`` so a dead
policy server costs one failed publish instead of the learner.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis
import torch
import torch.distributed as dist

from gsrl.weight_group import (
    _POLL_S,
    HEADER_LEN,
    HEADER_MAGIC,
    _broadcast,
    _Group,
    _Keys,
    _new_process_group,
    _redis_now,
    _timedelta,
    _wire_device,
)
from gsrl.weight_layout import (
    WIRE_DTYPES,
    Bucket,
    as_bytes,
    bucket_descriptor,
    flatten_bucket,
    layout_diff,
    layout_hash,
    plan_buckets,
    tensor_layout,
    unflatten_bucket,
)
from gsrl.weight_snapshot import read_snapshot, write_snapshot, write_version

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- publisher


@dataclass(frozen=True)
class PublishStats:
    """``bytes`` is the payload of one broadcast (not times subscribers); ``error`` says why a broadcast was skipped."""

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
    snapshot on publishes 1, k+1, 2k+1, ... (0: never), since for a large model it costs a full CPU copy.
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
        gloo_hostname: str | None = None,
    ) -> None:
        self._redis = redis_client
        self._key_prefix = key_prefix
        self._keys = _Keys(key_prefix)
        self._advertise_host = advertise_host
        self._backend = backend
        self._wire = _wire_device(backend, torch.device(device))
        self._bucket_bytes = int(bucket_bytes)
        self._timeout_s = float(timeout_s)
        self._ttl_s = float(subscriber_ttl_s)
        self._snapshot_every = int(snapshot_every)  # 0 = never
        self._gloo_hostname = gloo_hostname
        self._group: _Group | None = None
        self._excluded: dict[str, float] = {}  # id -> Redis time until which it is left out (failed to join)
        self._last_version: int | None = None
        self._publishes = 0
        self._closed = False
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
        layout = tensor_layout(state_dict)
        buckets = plan_buckets(layout, self._bucket_bytes)
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
                payload = self._send(self._group, state_dict, version, layout_hash(layout), buckets)
                sent_to = len(self._group.members)
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL/Redis raise errors of all kinds; training goes on
            error = f"broadcast failed: {exc}"
            logger.warning("weights v%d: %s; the group is rebuilt at the next publish", version, error)
            if self._group is not None:
                self._group.broken = True
                self._drop_group()
        snapshot_bytes = 0
        self._publishes += 1
        try:
            if self._snapshot_every and (self._publishes - 1) % self._snapshot_every == 0:
                snapshot_bytes = write_snapshot(self._redis, self._key_prefix, state_dict, version)
            else:
                write_version(self._redis, self._key_prefix, version)
        except redis.RedisError as exc:
            error = error or f"snapshot failed: {exc}"
            logger.warning("weights v%d: snapshot to Redis failed: %s", version, exc)
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

    def close(self) -> None:
        """Leave the group and tell subscribers (via ``announce``) that it is gone; the store closes with us."""
        if self._closed:
            return
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
        digest: int,
        buckets: Sequence[Bucket],
    ) -> int:
        sequence = group.sent + 1
        self._redis.set(self._keys.announce, f"{group.generation}:{sequence}")
        group.sent = sequence  # only once announced: subscribers count the same messages we do
        header = [HEADER_MAGIC, group.generation, sequence, version, len(buckets), digest, 0, self._bucket_bytes]
        _broadcast(group.pg, torch.tensor(header, dtype=torch.int64, device=self._wire), self._timeout_s)
        if buckets:
            _broadcast(group.pg, bucket_descriptor(buckets).to(self._wire), self._timeout_s)
        payload = 0
        for bucket in buckets:
            flat = flatten_bucket(bucket, state_dict, self._wire)
            _broadcast(group.pg, as_bytes(flat), self._timeout_s)
            payload += bucket.nbytes
        return payload

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None


# ---------------------------------------------------------------- subscriber

OnWeights = Callable[[dict[str, torch.Tensor], int], None]


class WeightSubscriber:
    """One per policy server. Loads the snapshot, registers, then receives on a daemon thread.

    ``on_weights(tensors, version)`` runs on the receiver thread, never concurrently with itself. The tensors are
    fresh (safe to keep, on ``device``) and match the template's names, shapes and dtypes. The policy server must
    swap them in under its own lock between batches; while the callback runs, the next message waits (the publisher
    gives up after ``timeout_s``), so keep it to a pointer swap or a quick ``load_state_dict``.

    ``backend=None`` follows the publisher's group: NCCL needs a cuda ``device``; gloo works with any ``device``
    (received on the CPU, then copied). An explicit backend that differs from the group's is logged and not joined.
    ``template`` only supplies names, shapes and dtypes (meta tensors will do).
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        subscriber_id: str,
        template: Mapping[str, torch.Tensor],
        on_weights: OnWeights,
        *,
        key_prefix: str = "gsrl",
        backend: str | None = None,
        device: str | torch.device = "cpu",
        timeout_s: float = 60.0,
        heartbeat_s: float = 2.0,
        gloo_hostname: str | None = None,
        poll_s: float = _POLL_S,
    ) -> None:
        self._redis = redis_client
        self.subscriber_id = subscriber_id
        self._member = f"{subscriber_id}@{uuid.uuid4().hex[:8]}"  # the key in the live set and the group
        self._layout = tensor_layout(template)
        self._digest = layout_hash(self._layout)
        self._on_weights = on_weights
        self._key_prefix = key_prefix
        self._keys = _Keys(key_prefix)
        self._backend = backend  # None: whatever the publisher's group uses
        self._device = torch.device(device)
        if backend is not None:
            _wire_device(backend, self._device)  # fail at construction, not at the first group
        self._timeout_s = float(timeout_s)
        self._heartbeat_s = float(heartbeat_s)
        self._gloo_hostname = gloo_hostname
        self._poll_s = float(poll_s)
        self._version: int | None = None
        self._refused = 0
        self._seen_generation = 0
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._receive_thread: threading.Thread | None = None

    @property
    def version(self) -> int | None:
        """The version last handed to ``on_weights`` (None before any)."""
        return self._version

    @property
    def refused_count(self) -> int:
        """Messages and snapshots refused because their layout did not match the template (export as a metric)."""
        return self._refused

    def start(self) -> int | None:
        """Load the latest snapshot (returns its version, or None), register as live, start the threads."""
        if self._receive_thread is not None:
            raise RuntimeError("WeightSubscriber.start() called twice")
        snapshot = read_snapshot(self._redis, self._key_prefix)
        if snapshot is not None:
            tensors, version = snapshot
            layout = tensor_layout(tensors)
            if layout != self._layout:
                self._refuse(version, "snapshot", layout_diff(self._layout, layout))
            else:
                self._deliver({k: v.to(self._device) for k, v in tensors.items()}, version)
        self._heartbeat()
        name = f"weights-{{}}-{self.subscriber_id}"
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=name.format("heartbeat"), daemon=True
        )
        self._receive_thread = threading.Thread(target=self._receive_loop, name=name.format("receive"), daemon=True)
        self._heartbeat_thread.start()
        self._receive_thread.start()
        return self._version

    def stop(self) -> None:
        """Deregister, leave the group, join the threads (up to about ``timeout_s`` if a transfer is under way)."""
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()  # first, so that a heartbeat in flight cannot re-register us
        try:
            self._redis.zrem(self._keys.subscribers, self._member)
        except redis.RedisError as exc:
            logger.warning("weight subscriber %s: deregister failed: %s", self.subscriber_id, exc)
        if self._receive_thread is not None:
            self._receive_thread.join(2 * self._timeout_s + 5)
            if self._receive_thread.is_alive():
                logger.warning("weight subscriber %s: receiver thread did not stop", self.subscriber_id)

    def _heartbeat(self) -> None:
        self._redis.zadd(self._keys.subscribers, {self._member: _redis_now(self._redis)})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._heartbeat()
            except redis.RedisError as exc:
                logger.warning("weight subscriber %s: heartbeat failed: %s", self.subscriber_id, exc)

    def _receive_loop(self) -> None:
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)  # the current device is per thread; NCCL work runs on this one
        while not self._stop.is_set():
            try:
                info = self._next_generation()
                group = self._join(info) if info else None
                if group is None:
                    self._stop.wait(self._poll_s)
                    continue
                try:
                    self._serve(group)
                finally:
                    group.close()
            except Exception as exc:  # noqa: BLE001 - any failure: wait for the next generation
                logger.warning("weight subscriber %s left its group: %s", self.subscriber_id, exc)
                self._stop.wait(max(self._poll_s, 0.5))  # do not spin on a Redis outage

    def _next_generation(self) -> dict | None:
        raw = self._redis.get(self._keys.group)
        info = json.loads(raw) if raw else None
        if info is None or int(info["generation"]) <= self._seen_generation:
            return None
        self._seen_generation = int(info["generation"])
        if self._member not in info["members"]:
            return None
        backend = info["backend"]
        try:
            if self._backend not in (None, backend):
                raise ValueError(f"this subscriber was configured for {self._backend}")
            info["device"] = _wire_device(backend, self._device)
        except ValueError as exc:
            logger.error("weight subscriber %s: not joining a %s group: %s", self.subscriber_id, backend, exc)
            return None
        return info

    def _join(self, info: dict) -> _Group | None:
        """Two-phase join: announce ourselves, then build the PG only if the publisher commits this generation."""
        generation, members = int(info["generation"]), tuple(info["members"])
        rank = members.index(self._member) + 1
        base = dist.TCPStore(
            info["host"],
            int(info["port"]),
            is_master=False,
            timeout=_timedelta(self._timeout_s),
            wait_for_workers=False,
        )
        store = dist.PrefixStore(self._keys.store_prefix.format(generation=generation), base)
        store.set(f"joined/{rank}", "1")
        deadline = time.monotonic() + self._timeout_s
        while not store.check(["commit"]):
            if self._stop.is_set() or time.monotonic() > deadline:
                return None
            time.sleep(self._poll_s / 2)
        if store.get("commit") != b"go":
            return None
        pg = _new_process_group(info["backend"], store, rank, len(members) + 1, self._timeout_s, self._gloo_hostname)
        logger.info("weight subscriber %s joined generation %d as rank %d", self.subscriber_id, generation, rank)
        return _Group(generation, members, pg, base, info["device"])

    def _serve(self, group: _Group) -> None:
        """Receive each announced message of this generation in order; return when the generation is replaced."""
        while not self._stop.is_set():
            raw = self._redis.get(self._keys.announce)
            generation, sent = (int(x) for x in (raw or b"0:0").decode().split(":"))
            if generation != group.generation:
                logger.info("weight subscriber %s: generation %d is over", self.subscriber_id, group.generation)
                return
            while group.sent < sent:
                group.sent += 1
                try:
                    self._receive_one(group, group.sent)
                except Exception:
                    group.broken = True
                    raise
            self._stop.wait(self._poll_s)

    def _receive_one(self, group: _Group, sequence: int) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=group.device)
        _broadcast(group.pg, header, self._timeout_s)
        magic, generation, seq, version, num_buckets, digest, _flags, bucket_bytes = header.tolist()
        if (magic, generation, seq) != (HEADER_MAGIC, group.generation, sequence):
            raise RuntimeError(
                f"out of step: header {(magic, generation, seq)}, expected {group.generation}:{sequence}"
            )
        descriptor = torch.empty((num_buckets, 2), dtype=torch.int64, device=group.device)
        if num_buckets:
            _broadcast(group.pg, descriptor, self._timeout_s)
        sizes = [(WIRE_DTYPES[code], numel) for code, numel in descriptor.tolist()]
        plan = plan_buckets(self._layout, bucket_bytes) if digest == self._digest else ()
        matches = digest == self._digest and [(b.dtype, b.numel) for b in plan] == sizes
        tensors: dict[str, torch.Tensor] = {}
        for index, (dtype, numel) in enumerate(sizes):  # on a mismatch, drain anyway so the group stays in step
            flat = torch.empty(numel, dtype=dtype, device=group.device)
            _broadcast(group.pg, as_bytes(flat), self._timeout_s)
            if matches:
                tensors.update(unflatten_bucket(plan[index], flat))
        if not matches:
            self._refuse(version, "broadcast", f"layout hash {digest:#x} != template {self._digest:#x}")
            return
        self._deliver({name: t.to(self._device) for name, t in tensors.items()}, version)

    def _deliver(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        if self._version is not None and version <= self._version:
            logger.info("weight subscriber %s: ignoring v%d (holding v%d)", self.subscriber_id, version, self._version)
            return
        try:
            self._on_weights(tensors, version)
        except Exception:
            logger.exception("weight subscriber %s: on_weights failed for v%d", self.subscriber_id, version)
            return
        self._version = version

    def _refuse(self, version: int, source: str, why: str) -> None:
        self._refused += 1
        logger.error(
            "weight subscriber %s: refusing %s v%d, layout differs from the template: %s",
            self.subscriber_id,
            source,
            version,
            why,
        )
