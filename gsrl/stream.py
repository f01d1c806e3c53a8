"""Trajectory segments <-> the Redis stream that connects policy servers to learners.

Producers (policy servers) append ``gsrl.v1.TrajectorySegment`` protobufs with XADD and wait while
the stream holds ``max_stream_len`` unacknowledged segments (back-pressure instead of trimming,
so nothing accepted is ever thrown away). Learners read with a consumer group, acknowledge an
entry (XACK + XDEL) only after an update used it, and count segments dropped for policy lag.
A restarted learner rank re-reads its own pending entries first, so a crash loses nothing; both sides
wait out a Redis restart (``gsrl.redis_conn.retry``) instead of crashing.

An entry holds its payload inline (field ``seg``) or, from ``inline_max_bytes`` on (image segments), the name of
a key that holds it (field ``ref``): the append must be a Lua script (the dedupe and the length check are
conditional), and Redis turns every script argument into a Lua string at about 1 us per KiB, twenty times what an
XADD of the same bytes costs its single thread. A large payload is therefore SET on its own, in the same round
trip, and only its key name goes through the script; it is deleted with its entry.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from google.protobuf.message import DecodeError

from gsrl import codec
from gsrl.redis_conn import TRANSIENT as TRANSIENT_ERRORS
from gsrl.redis_conn import is_transient, retry
from gsrl.trajectory import EpisodeSummary, Segment
from gsrl.v1 import trajectory_pb2

log = logging.getLogger(__name__)

SEGMENT_FIELD = b"seg"
PAYLOAD_REF_FIELD = b"ref"
INLINE_MAX_BYTES = 64 << 10


class SegmentDecodeError(ValueError):
    """A stream entry is not a valid TrajectorySegment."""


# Per-step tensors of a segment, each [T, ...]; their order in the protobuf does not matter.
_STEP_FIELDS = (
    "action_chunks",
    "logprobs",
    "values",
    "rewards",
    "terminated",
    "truncated",
    "next_values",
    "policy_versions",
)


def _tag(field: str) -> bytes:
    """The wire tag of a length-delimited field of TrajectorySegment."""
    return codec.varint(trajectory_pb2.TrajectorySegment.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


_STEP_TAGS = tuple((name, _tag(name)) for name in _STEP_FIELDS)
_OBSERVATIONS_TAG, _EXTRAS_TAG = _tag("observations"), _tag("extras")


def segment_to_bytes(segment: Segment, segment_id: str = "", policy_version: int | None = None) -> bytes:
    """A serialized ``gsrl.v1.TrajectorySegment``, written without building the tensor messages.

    upb builds the scalar fields; the tensor fields are appended as bytes (``codec.append_tensor_field``).
    Protobuf parsers accept fields in any order, and a field repeated in two concatenated parts is merged, so
    this parses exactly as ``segment_to_proto`` builds it, at about half the Python cost per segment and with the
    tensor data copied once instead of three times. ``segment_id`` and ``policy_version`` default to the segment's
    own (a new uuid if it has none).
    """
    pieces: list = [
        trajectory_pb2.TrajectorySegment(
            segment_id=segment_id or segment.segment_id or uuid.uuid4().hex,
            env_key=segment.env_key,
            policy_version=segment.policy_version if policy_version is None else policy_version,
            instructions=segment.instructions,
            created_unix=segment.created_unix or time.time(),
            episodes=[
                trajectory_pb2.EpisodeSummary(
                    episode_return=ep.episode_return, episode_length=ep.episode_length, success_once=ep.success_once
                )
                for ep in segment.episodes
            ],
        ).SerializeToString()
    ]
    codec.append_tensor_map_field(pieces, _OBSERVATIONS_TAG, segment.observations)
    for name, tag in _STEP_TAGS:
        codec.append_tensor_field(pieces, tag, getattr(segment, name))
    codec.append_tensor_map_field(pieces, _EXTRAS_TAG, segment.extras)
    return b"".join(pieces)


def segment_to_proto(segment: Segment) -> trajectory_pb2.TrajectorySegment:
    """The segment as a message (for tests and tools; the producer stores ``segment_to_bytes`` directly)."""
    return trajectory_pb2.TrajectorySegment.FromString(segment_to_bytes(segment))


def segment_from_proto(msg: trajectory_pb2.TrajectorySegment) -> Segment:
    """Decode and check that every per-step tensor has the same length T."""
    try:
        observations = codec.decode_map_torch(msg.observations, "observations/")
        extras = codec.decode_map_torch(msg.extras, "extras/")
        steps = {name: codec.to_torch(getattr(msg, name), name) for name in _STEP_FIELDS}
    except codec.TensorDecodeError as exc:
        raise SegmentDecodeError(str(exc)) from exc
    rewards = steps["rewards"]
    length = int(rewards.shape[0]) if rewards.dim() else 0
    if length == 0:
        raise SegmentDecodeError("segment has no transitions")
    for prefix, tensors in (("", steps), ("observations/", observations), ("extras/", extras)):
        for name, tensor in tensors.items():
            if tensor.dim() == 0 or tensor.shape[0] != length:
                shape = list(tensor.shape)
                raise SegmentDecodeError(f"'{prefix}{name}' has shape {shape}, expected leading dim {length}")
    if steps["action_chunks"].dim() != 3:
        raise SegmentDecodeError(f"'action_chunks' must be [T, C, A], got {list(steps['action_chunks'].shape)}")
    return Segment(
        observations=observations,
        **steps,
        instructions=list(msg.instructions),
        episodes=[EpisodeSummary(e.episode_return, e.episode_length, e.success_once) for e in msg.episodes],
        extras=extras,
        segment_id=msg.segment_id,
        env_key=msg.env_key,
        created_unix=msg.created_unix,
    )


@dataclass(frozen=True)
class StreamKeys:
    """Every Redis key the trajectory stream uses, derived from one prefix."""

    prefix: str = "gsrl"
    stream_name: str = "segments"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:{self.stream_name}"

    @property
    def dead_letters(self) -> str:
        return f"{self.stream}:dead"

    @property
    def produced(self) -> str:
        return f"{self.prefix}:stats:segments_produced"

    @property
    def consumed(self) -> str:
        return f"{self.prefix}:stats:segments_consumed"

    @property
    def dropped(self) -> str:
        return f"{self.prefix}:stats:segments_dropped"

    @property
    def env_steps(self) -> str:
        return f"{self.prefix}:stats:env_steps"

    @property
    def policy_version(self) -> str:
        return f"{self.prefix}:policy_version"

    def seen(self, segment_id: str) -> str:
        """The dedupe key of one segment id (expires after ``DEDUPE_TTL_S``)."""
        return f"{self.prefix}:seen:{segment_id}"

    def payload(self, segment_id: str) -> str:
        """Where a large segment's payload lives while its entry is in the stream."""
        return f"{self.prefix}:payload:{segment_id}"


# XADD + count, at most once per segment id, for a batch of segments in one round trip and in order, stopping at
# the first that finds the stream full (ARGV[1] = max_len; 0: no limit). Checking the length here, atomically with
# the XADD, saves the XLEN round trip per segment and keeps concurrent producers from overshooting ``max_len``.
# A producer that lost the reply (Redis restarting under it) retries the same segments, and the retry must not
# store any twice: the dedupe key expires after ARGV[2] s. Returns one item per segment handled: the stream id,
# or 0 for one already stored; fewer items than segments means the stream filled up (or, never seen in practice,
# a staged payload was evicted: the retry stages it again).
# KEYS = stream, produced counter, then one dedupe key per segment; ARGV = max_len, ttl, then per segment
# (field, value, version): ('seg', payload) or ('ref', the key its payload was SET to ahead of this call).
# A referenced payload is staged with a TTL (so one that never gets an entry expires) and made persistent here.
_APPEND = """
local max_len, ttl = tonumber(ARGV[1]), ARGV[2]
local length = 0
if max_len > 0 then length = redis.call('XLEN', KEYS[1]) end
local results, added = {}, 0
for i = 1, #KEYS - 2 do
  if max_len > 0 and length >= max_len then break end
  local field, value = ARGV[3 * i], ARGV[3 * i + 1]
  if field == 'ref' and redis.call('EXISTS', value) == 0 then break end
  if redis.call('SET', KEYS[2 + i], 1, 'NX', 'EX', ttl) then
    if field == 'ref' then redis.call('PERSIST', value) end
    results[i] = redis.call('XADD', KEYS[1], '*', field, value, 'v', ARGV[3 * i + 2])
    added = added + 1
    length = length + 1
  else
    results[i] = 0
  end
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
return results
"""
# Acknowledge + delete + count in one step, counting only entries this call actually acknowledged: an entry
# delivered twice (re-claimed from a consumer presumed dead that was only slow) is counted once. XACK and XDEL
# take many ids per call (sliced: ``unpack`` is bounded by Lua's C stack), instead of two calls per id.
# KEYS[4..] are the payload keys of referenced entries among them, deleted with their entries.
_ACKNOWLEDGE = """
local group, n_consumed = ARGV[1], tonumber(ARGV[2])
local function each_slice(list, first, last, fn)
  local total = 0
  for i = first, last, 1000 do total = total + fn(unpack(list, i, math.min(i + 999, last))) end
  return total
end
local function ack(first, last)
  return each_slice(ARGV, first, last, function(...)
    local acked = redis.call('XACK', KEYS[1], group, ...)
    redis.call('XDEL', KEYS[1], ...)
    return acked
  end)
end
local consumed = ack(3, 2 + n_consumed)
local dropped = ack(3 + n_consumed, #ARGV)
each_slice(KEYS, 4, #KEYS, function(...) return redis.call('DEL', ...) end)
if consumed > 0 then redis.call('INCRBY', KEYS[2], consumed) end
if dropped > 0 then redis.call('INCRBY', KEYS[3], dropped) end
return {consumed, dropped}
"""
# KEYS[4], if given, is the entry's payload key: the payload moves into the dead-letter entry (a rare path).
_DEAD_LETTER = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #KEYS > 3 then redis.call('DEL', KEYS[4]) end
if acked == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'entry', ARGV[2], 'seg', ARGV[3], 'reason', ARGV[4])
  redis.call('INCR', KEYS[3])
end
return acked
"""
DEDUPE_TTL_S = 3600
# One script call carries at most this many segments and bytes, so a burst of image segments does not become one
# huge request that holds Redis (single-threaded) for long.
_MAX_BATCH_SEGMENTS = 256
_MAX_BATCH_BYTES = 16 << 20


class SegmentProducer:
    """Appends segments to the stream, waiting while ``max_len`` are unacknowledged.

    A Redis that is down or restarting is waited out (retry with back-off), so the policy server holds its
    env streams instead of crashing; once ``append`` returns, the segment is in Redis (and, with append-only
    persistence, survives a restart of it). Payloads of ``inline_max_bytes`` or more are stored by reference.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        max_len: int,
        poll_s: float = 0.05,
        should_stop: Callable[[], bool] = lambda: False,
        give_up_s: float = 30.0,
        inline_max_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        self.client = client
        self.keys = keys
        self.max_len = max_len
        self.poll_s = poll_s
        self.should_stop = should_stop
        # A stopping producer waits at most this long for Redis before giving a segment up (and saying so).
        self.give_up_s = give_up_s
        self.inline_max_bytes = inline_max_bytes
        self.backpressure_s = 0.0
        self._append_script = client.register_script(_APPEND)

    def stream_length(self, should_stop: Callable[[], bool] | None = None) -> int:
        return int(retry(lambda: self.client.xlen(self.keys.stream), "XLEN", should_stop or self.should_stop))

    def append(self, segment: Segment) -> bytes | None:
        """XADD one segment (after waiting for room); returns its stream id (None if it was already stored).

        Raises a Redis connection error only when the producer is stopping and Redis stayed unreachable for
        ``give_up_s`` (at most 30 s) more: that segment was never stored, and the error says so.
        """
        return self.append_many([segment])[0]

    def append_many(self, segments: Sequence[Segment]) -> list[bytes | None]:
        """``append`` for several segments, in order, in one round trip per batch while the stream has room.

        A policy server completes the segments of all envs of a stream at the same step; one round trip for all
        of them instead of one each is what keeps the transport near raw XADD speed. Waits for room exactly as
        ``append`` does (the segments that fit go in; the rest wait), and raises as it does.
        """
        # The ids are fixed here, before the first try, so that a retry carries the same ones.
        ids = [segment.segment_id or uuid.uuid4().hex for segment in segments]
        versions = [segment.policy_version for segment in segments]
        payloads = [segment_to_bytes(*args) for args in zip(segments, ids, versions, strict=True)]
        results: list[bytes | None] = []
        stopping_since: list[float] = []

        def stop_waiting() -> bool:  # keep trying while running; a stopping producer gets give_up_s more
            if not self.should_stop():
                return False
            stopping_since[:1] = stopping_since[:1] or [time.monotonic()]
            return time.monotonic() - stopping_since[0] > min(self.give_up_s, 30.0)

        try:
            while len(results) < len(segments):
                first = len(results)
                last = _batch_end(payloads, first)
                # A stopping producer no longer waits for room: its last segments go in regardless.
                max_len = 0 if self.should_stop() else self.max_len
                keys = [self.keys.stream, self.keys.produced]
                args: list[bytes | str | int] = [max_len, DEDUPE_TTL_S]
                staged: list[tuple[str, bytes]] = []
                batch = zip(ids[first:last], payloads[first:last], versions[first:last], strict=True)
                for segment_id, payload, version in batch:
                    keys.append(self.keys.seen(segment_id))
                    if len(payload) >= self.inline_max_bytes:
                        staged.append((self.keys.payload(segment_id), payload))
                        args += (PAYLOAD_REF_FIELD, staged[-1][0], version)
                    else:
                        args += (SEGMENT_FIELD, payload, version)
                reply = retry(partial(self._append, keys, args, staged), "XADD segments", stop_waiting)
                results += [entry_id or None for entry_id in reply]
                if len(reply) < last - first:
                    self._wait_for_room(stop_waiting)
        except TRANSIENT_ERRORS:
            for segment_id, segment in zip(ids[len(results) :], segments[len(results) :], strict=True):
                log.error("segment %s of %s lost: redis unreachable while stopping", segment_id, segment.env_key)
            raise
        return results

    def _append(self, keys: list[str], args: list[bytes | str | int], staged: list[tuple[str, bytes]]) -> list:
        """One round trip: the staged payloads' SETs (if any), then the script. Safe to repeat (see ``_APPEND``)."""
        command = ("EVALSHA", self._append_script.sha, len(keys), *keys, *args)
        for _ in range(2):  # the second time after loading the script into a Redis that lost it (a restart)
            try:
                if not staged:
                    return _execute_in_one_write(self.client, *command)
                with self.client.pipeline(transaction=False) as pipe:
                    for key, payload in staged:
                        # NX: a payload an earlier try already got an entry for (persistent now) is left alone.
                        pipe.set(key, payload, nx=True, ex=DEDUPE_TTL_S)
                    pipe.execute_command(*command)
                    return pipe.execute()[-1]
            except redis.exceptions.NoScriptError:
                self.client.script_load(_APPEND)
        raise RuntimeError("redis keeps losing the append script")

    def _wait_for_room(self, stop_waiting: Callable[[], bool]) -> None:
        """Poll XLEN (no payload re-sent) until the stream has room or the producer stops; counts the wait."""
        waited_from = time.monotonic()
        while self.stream_length(stop_waiting) >= self.max_len and not self.should_stop():
            time.sleep(self.poll_s)
        self.backpressure_s += time.monotonic() - waited_from


def _execute_in_one_write(client: redis.Redis, *args: bytes | str | int) -> Any:
    """``client.execute_command(*args)``, with the whole command sent in one socket write.

    redis-py writes a command in pieces once its buffer passes 6 KB, one ``sendall`` each: a script call carrying 16
    segments of 4.5 KiB went out in about 16 writes, and each write into a loopback socket costs the client about
    5 us in the kernel (it also wakes Redis to read a part). Joining the pieces first (one extra copy of a batch that
    is at most ``_MAX_BATCH_BYTES``) made the append about 5 us of client CPU cheaper per segment. A connection that
    raised anything but a reply error is closed, so a half-sent command or an unread reply never reaches its next user.
    """
    if client.connection is not None:  # a single-connection client: keep its own locking
        return client.execute_command(*args)
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except TypeError:  # redis-py 5 wants the command name
        connection = pool.get_connection(args[0])
    try:
        connection.send_packed_command([b"".join(connection.pack_command(*args))])
        return client.parse_response(connection, args[0])
    except redis.exceptions.ResponseError:
        raise
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _batch_end(payloads: Sequence[bytes], first: int) -> int:
    """End (exclusive) of the batch starting at ``first``: at least one segment, then within both limits."""
    end, size = first + 1, len(payloads[first])
    while end < len(payloads) and end - first < _MAX_BATCH_SEGMENTS and size + len(payloads[end]) <= _MAX_BATCH_BYTES:
        size += len(payloads[end])
        end += 1
    return end


@dataclass
class StreamEntry:
    entry_id: bytes
    segment: Segment


class SegmentConsumer:
    """One learner rank's view of the stream: a named consumer in a consumer group.

    Delivered entries stay in the group's pending list until ``acknowledge``. A restarted rank (same consumer
    name) re-reads its own pending entries first; with ``claim_idle_ms`` it also takes over entries that have
    been pending at any other consumer for that long (a rank that died and never came back, or was renamed).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        group: str,
        consumer: str,
        claim_idle_ms: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.should_stop = should_stop
        # After a restart, this consumer's unacknowledged entries are replayed from this cursor first.
        self._pending_cursor: bytes | None = b"0"
        # Delivered to the caller and not yet acknowledged (never handed out twice by a re-read), with the payload
        # key of each that is stored by reference (deleted when it is acknowledged).
        self._outstanding: dict[bytes, bytes | None] = {}
        self._next_claim = 0.0
        self._acknowledge_script = client.register_script(_ACKNOWLEDGE)
        self._dead_letter_script = client.register_script(_DEAD_LETTER)
        retry(self.ensure_group, "XGROUP CREATE", should_stop)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int) -> list[StreamEntry]:
        """Up to ``count`` entries: first this consumer's unacknowledged ones (after a restart), then new ones.

        Entries that do not decode are moved to the dead-letter stream and acknowledged, so one bad
        producer cannot stall the learners. While Redis is unreachable this returns [] after a short wait;
        the next read re-scans the pending list, since a lost XREADGROUP reply may have delivered entries.
        """
        try:
            return self._read(count, block_ms)
        except Exception as exc:
            if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
                log.warning("consumer group %s is gone (redis lost its data?): recreating it", self.group)
                self.ensure_group()
                return []
            if not is_transient(exc):
                raise
            log.warning("redis unavailable while reading segments (%s); retrying", exc)
            self._pending_cursor = b"0"
            time.sleep(min(1.0, max(block_ms, 100) / 1000.0))
            return []

    def _read(self, count: int, block_ms: int) -> list[StreamEntry]:
        while self._pending_cursor is not None:
            entries, last_id = self._xread(self._pending_cursor, count, None)
            if last_id is None:
                self._pending_cursor = None
                break
            self._pending_cursor = last_id
            if entries:
                log.info("re-reading %d unacknowledged segments of consumer %s", len(entries), self.consumer)
                return entries
        if self.claim_idle_ms > 0 and time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + max(1.0, self.claim_idle_ms / 4000.0)
            claimed = self._claim(count)
            if claimed:
                return claimed
        return self._xread(">", count, block_ms)[0]

    def _claim(self, count: int) -> list[StreamEntry]:
        """XAUTOCLAIM entries idle at other consumers for ``claim_idle_ms`` (their owner is presumed dead)."""
        reply = self.client.xautoclaim(
            self.keys.stream, self.group, self.consumer, self.claim_idle_ms, start_id="0-0", count=count
        )
        items = reply[1] if len(reply) > 1 else []
        entries = self._decode([(entry_id, fields) for entry_id, fields in items if entry_id not in self._outstanding])
        if entries:
            log.warning("claimed %d segments left pending by another consumer", len(entries))
        return entries

    def _xread(self, start: str | bytes, count: int, block_ms: int | None) -> tuple[list[StreamEntry], bytes | None]:
        """Decoded entries, and the id of the last entry the reply held (None when it held none)."""
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.keys.stream: start}, count=count, block=block_ms
        )
        items = []
        last_id = None
        for _stream, stream_items in reply or []:
            for entry_id, fields in stream_items:
                last_id = entry_id
                if entry_id not in self._outstanding:
                    items.append((entry_id, fields))
        return self._decode(items), last_id

    def _decode(self, items: list[tuple[bytes, dict | None]]) -> list[StreamEntry]:
        # Payloads stored by reference come in one MGET for the whole batch.
        refs = [f[PAYLOAD_REF_FIELD] for _, f in items if f and SEGMENT_FIELD not in f and PAYLOAD_REF_FIELD in f]
        fetched = dict(zip(refs, self.client.mget(refs), strict=True)) if refs else {}
        entries: list[StreamEntry] = []
        for entry_id, fields in items:
            if fields is None:  # deleted while pending
                self.client.xack(self.keys.stream, self.group, entry_id)
                continue
            ref = fields.get(PAYLOAD_REF_FIELD) if SEGMENT_FIELD not in fields else None
            payload = fields.get(SEGMENT_FIELD) if ref is None else fetched.get(ref)
            try:
                if payload is None:
                    raise KeyError(f"payload {ref!r} is missing" if ref else SEGMENT_FIELD)
                msg = trajectory_pb2.TrajectorySegment.FromString(payload)
                entries.append(StreamEntry(entry_id, segment_from_proto(msg)))
                self._outstanding[entry_id] = ref
            except (KeyError, DecodeError, SegmentDecodeError, ValueError) as exc:
                self._dead_letter(entry_id, payload or b"", ref, str(exc) or type(exc).__name__)
        return entries

    def _dead_letter(self, entry_id: bytes, payload: bytes, ref: bytes | None, reason: str) -> None:
        log.error("segment %s is malformed (%s): moved to %s", entry_id, reason, self.keys.dead_letters)
        self._dead_letter_script(
            keys=[self.keys.stream, self.keys.dead_letters, self.keys.dropped, *([ref] if ref else [])],
            args=[self.group, entry_id, payload, reason.encode()],
        )

    def acknowledge(self, consumed: Sequence[bytes], dropped: Sequence[bytes] = ()) -> None:
        """Mark entries done after an update used them (and drop stale ones), atomically; retried across a
        Redis restart (an entry whose acknowledgement never lands is re-read later: trained twice, not lost)."""
        ids = [*consumed, *dropped]
        if not ids:
            return
        refs = [ref for entry_id in ids if (ref := self._outstanding.get(entry_id))]
        retry(
            lambda: self._acknowledge_script(
                keys=[self.keys.stream, self.keys.consumed, self.keys.dropped, *refs],
                args=[self.group, len(consumed), *ids],
            ),
            "XACK segments",
            self.should_stop,
        )
        for entry_id in ids:
            self._outstanding.pop(entry_id, None)


def read_counter(client: redis.Redis, key: str, give_up_s: float = 30.0) -> int:
    value = retry(lambda: client.get(key), f"GET {key}", give_up_s=give_up_s)
    return int(value) if value is not None else 0
