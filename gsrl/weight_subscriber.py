"""The policy server's end of the weight broadcast: ``WeightSubscriber``.

See ``gsrl.weights`` for the channel as a whole (groups, generations, the wire format and the snapshot).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping

import redis
import torch
import torch.distributed as dist

from gsrl.weight_group import (
    _POLL_S,
    HEADER_LEN,
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
    WIRE_DTYPES,
    Bucket,
    BufferPool,
    as_bytes,
    layout_diff,
    layout_hash,
    piece_ranges,
    plan_buckets,
    tensor_layout,
)
from gsrl.weight_snapshot import (
    read_snapshot,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- subscriber

OnWeights = Callable[[dict[str, torch.Tensor], int], None]


class WeightSubscriber:
    """One per policy server. Loads the snapshot, registers, then receives on a daemon thread.

    ``on_weights(tensors, version)`` runs on the receiver thread, never concurrently with itself. The tensors are
    safe to keep (on ``device``) and match the template's names, shapes and dtypes. They are views of receive buffers
    that are allocated once and reused for later versions, but only once nobody holds any tensor of that set any more:
    a consumer that keeps them (``PolicyHost`` parks them until its next batch) costs at most a second buffer set,
    never a torn one, and one that copies them out (``load_state_dict``) and lets go gets the same set back next time.
    The policy server must swap them in under its own lock between batches; while the callback runs, the next message
    waits (the publisher gives up after ``timeout_s``), so keep it to a pointer swap or a quick ``load_state_dict``.

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
        self._plans: dict[int, tuple[Bucket, ...]] = {}  # bucket_bytes -> plan of the template
        self._pool = BufferPool(max_sets=2)  # one held by the consumer, one to receive into
        self._drain = torch.empty(0, dtype=torch.uint8)  # where a refused message's bytes go
        self._stop = threading.Event()
        self._wake: redis.client.PubSub | None = None  # the receive thread's alone
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
                    self._wait_for_wake()
                    continue
                try:
                    self._serve(group)
                finally:
                    group.close()
            except Exception as exc:  # noqa: BLE001 - any failure: wait for the next generation
                logger.warning("weight subscriber %s left its group: %s", self.subscriber_id, exc)
                self._stop.wait(max(self._poll_s, 0.5))  # do not spin on a Redis outage
        self._close_wake()

    def _wait_for_wake(self) -> None:
        """Up to ``poll_s``, returning early when the publisher posts to ``wake`` (a new message or generation).

        Subscribed before the caller's next read of ``announce``, so a post between that read and this wait is
        either seen here or already reflected in the key; a Redis error falls back to a plain poll.
        """
        try:
            if self._wake is None:
                self._wake = self._redis.pubsub(ignore_subscribe_messages=True)
                self._wake.subscribe(self._keys.wake)
            self._wake.get_message(timeout=self._poll_s)
            while self._wake.get_message(timeout=0) is not None:  # several posts in a row: one read of the key
                pass
        except redis.RedisError as exc:
            logger.debug("weight subscriber %s: wake channel: %s", self.subscriber_id, exc)
            self._close_wake()
            self._stop.wait(self._poll_s)

    def _close_wake(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(redis.RedisError):
                self._wake.close()
            self._wake = None

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
            self._wait_for_wake()

    def _receive_one(self, group: _Group, sequence: int) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=group.device)
        _broadcast(group.pg, header, self._timeout_s)
        magic, generation, seq, version, num_buckets, digest, piece_bytes, bucket_bytes = header.tolist()
        if (magic, generation, seq) != (HEADER_MAGIC, group.generation, sequence):
            raise RuntimeError(
                f"out of step: header {(magic, generation, seq)}, expected {group.generation}:{sequence}"
            )
        descriptor = torch.empty((num_buckets, 2), dtype=torch.int64, device=group.device)
        if num_buckets:
            _broadcast(group.pg, descriptor, self._timeout_s)
        sizes = [(WIRE_DTYPES[code], numel) for code, numel in descriptor.tolist()]
        plan = self._plan(bucket_bytes) if digest == self._digest else ()
        if digest != self._digest or [(b.dtype, b.numel) for b in plan] != sizes:
            drain = [  # receive anyway so the group stays in step
                self._drain_buffer((stop - start) * dtype.itemsize, group.device)
                for dtype, numel in sizes
                for start, stop in piece_ranges(numel, dtype.itemsize, piece_bytes)
            ]
            self._wait_all(group, self._post(group, drain))
            self._refuse(version, "broadcast", f"layout hash {digest:#x} != template {self._digest:#x}")
            return
        buffers = self._pool.acquire(plan, group.device)
        pieces = [
            as_bytes(flat[start:stop])
            for flat in buffers.flats
            for start, stop in piece_ranges(flat.numel(), flat.element_size(), piece_bytes)
        ]
        works = self._post(group, pieces)
        # Over NCCL the bytes are still travelling and these are views only: a thousand of them cost milliseconds of
        # CPU, about what 1 GiB takes over NVLink, so they are made meanwhile. Over gloo the bytes are in (and may
        # move to another device here).
        tensors = buffers.tensors(self._device)
        del buffers, pieces  # only the views in ``tensors`` keep the set busy now
        self._wait_all(group, works)
        self._deliver(tensors, version)

    def _post(self, group: _Group, pieces: list[torch.Tensor]) -> list[dist.Work]:
        """Receive ``pieces`` in order: over gloo here, one after another; over NCCL posted at once for ``_wait_all``.

        NCCL runs them in order on its own stream, so nothing needs the CPU in between; waiting for each (as gloo
        does) left the link idle while the CPU noticed that the previous piece was done.
        """
        if not _stream_ordered(group.device):
            for piece in pieces:
                _broadcast(group.pg, piece, self._timeout_s)
            return []
        return [_broadcast_start(group.pg, piece, self._timeout_s) for piece in pieces]

    def _wait_all(self, group: _Group, works: list[dist.Work]) -> None:
        """Block until every posted receive is in, so ``on_weights`` gets bytes that any stream may read at once."""
        for work in works:
            _wait(work, self._timeout_s, group.device)

    def _plan(self, bucket_bytes: int) -> tuple[Bucket, ...]:
        """The template's bucket plan for the publisher's ``bucket_bytes`` (computed once per size)."""
        if bucket_bytes not in self._plans:
            self._plans = {bucket_bytes: plan_buckets(self._layout, bucket_bytes)}
        return self._plans[bucket_bytes]

    def _drain_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A scratch byte buffer of at least ``nbytes`` on ``device``, grown as needed and never handed out."""
        if self._drain.numel() < nbytes or self._drain.device != device:
            self._drain = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self._drain[:nbytes]

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
