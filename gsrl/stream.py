"""Trajectory segments <-> the Redis stream that connects policy servers to learners.

Producers (policy servers) append ``gsrl.v1.TrajectorySegment`` protobufs with XADD and wait while
the stream holds ``max_stream_len`` unacknowledged segments (back-pressure instead of trimming,
so nothing accepted is ever thrown away). Learners read with a consumer group, acknowledge an
entry (XACK + XDEL) only after an update used it, and count segments dropped for policy lag.
A restarted learner rank re-reads its own pending entries first, so a crash loses nothing; both sides
wait out a Redis restart (``gsrl.redis_conn.retry``) instead of crashing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from google.protobuf.message import DecodeError

from gsrl import codec
from gsrl.redis_conn import TRANSIENT as TRANSIENT_ERRORS
from gsrl.redis_conn import is_transient, retry
from gsrl.trajectory import EpisodeSummary, Segment
from gsrl.v1 import trajectory_pb2

log = logging.getLogger(__name__)

SEGMENT_FIELD = b"seg"


class SegmentDecodeError(ValueError):
    """A stream entry is not a valid TrajectorySegment."""


def segment_to_proto(segment: Segment) -> trajectory_pb2.TrajectorySegment:
    msg = trajectory_pb2.TrajectorySegment(
        segment_id=segment.segment_id or uuid.uuid4().hex,
        env_key=segment.env_key,
        policy_version=segment.policy_version,
        instructions=segment.instructions,
        created_unix=segment.created_unix or time.time(),
    )
    msg.observations.CopyFrom(codec.encode_map(segment.observations))
    for name in ("action_chunks", "logprobs", "values", "rewards", "terminated", "truncated", "next_values"):
        getattr(msg, name).CopyFrom(codec.encode(getattr(segment, name)))
    msg.policy_versions.CopyFrom(codec.encode(segment.policy_versions))
    for ep in segment.episodes:
        msg.episodes.add(
            episode_return=ep.episode_return, episode_length=ep.episode_length, success_once=ep.success_once
        )
    return msg


def segment_from_proto(msg: trajectory_pb2.TrajectorySegment) -> Segment:
    """Decode and check that every per-step tensor has the same length T."""
    try:
        segment = Segment(
            observations=codec.decode_map_torch(msg.observations, "observations/"),
            action_chunks=codec.to_torch(msg.action_chunks, "action_chunks"),
            logprobs=codec.to_torch(msg.logprobs, "logprobs"),
            values=codec.to_torch(msg.values, "values"),
            rewards=codec.to_torch(msg.rewards, "rewards"),
            terminated=codec.to_torch(msg.terminated, "terminated"),
            truncated=codec.to_torch(msg.truncated, "truncated"),
            next_values=codec.to_torch(msg.next_values, "next_values"),
            policy_versions=codec.to_torch(msg.policy_versions, "policy_versions"),
            instructions=list(msg.instructions),
            episodes=[EpisodeSummary(e.episode_return, e.episode_length, e.success_once) for e in msg.episodes],
            segment_id=msg.segment_id,
            env_key=msg.env_key,
            created_unix=msg.created_unix,
        )
    except codec.TensorDecodeError as exc:
        raise SegmentDecodeError(str(exc)) from exc
    length = segment.length
    if length == 0:
        raise SegmentDecodeError("segment has no transitions")
    per_step = {
        "action_chunks": segment.action_chunks,
        "logprobs": segment.logprobs,
        "values": segment.values,
        "terminated": segment.terminated,
        "truncated": segment.truncated,
        "next_values": segment.next_values,
        "policy_versions": segment.policy_versions,
        **{f"observations/{k}": v for k, v in segment.observations.items()},
    }
    for name, tensor in per_step.items():
        if tensor.dim() == 0 or tensor.shape[0] != length:
            raise SegmentDecodeError(f"'{name}' has shape {list(tensor.shape)}, expected leading dim {length}")
    if segment.action_chunks.dim() != 3:
        raise SegmentDecodeError(f"'action_chunks' must be [T, C, A], got {list(segment.action_chunks.shape)}")
    return segment


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


# XADD + count, at most once per segment id: a producer that lost the reply to an XADD (Redis restarting
# under it) retries the same segment, and the retry must not store it twice. The dedupe key expires.
_APPEND = """
if redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[3]) then
  local id = redis.call('XADD', KEYS[1], '*', 'seg', ARGV[1], 'v', ARGV[2])
  redis.call('INCR', KEYS[2])
  return id
end
return false
"""
# Acknowledge + delete + count in one step, counting only entries this call actually acknowledged: an entry
# delivered twice (re-claimed from a consumer presumed dead that was only slow) is counted once.
_ACKNOWLEDGE = """
local group, n_consumed = ARGV[1], tonumber(ARGV[2])
local consumed, dropped = 0, 0
for i = 3, #ARGV do
  local acked = redis.call('XACK', KEYS[1], group, ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  if i - 2 <= n_consumed then consumed = consumed + acked else dropped = dropped + acked end
end
if consumed > 0 then redis.call('INCRBY', KEYS[2], consumed) end
if dropped > 0 then redis.call('INCRBY', KEYS[3], dropped) end
return {consumed, dropped}
"""
_DEAD_LETTER = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'entry', ARGV[2], 'seg', ARGV[3], 'reason', ARGV[4])
  redis.call('INCR', KEYS[3])
end
return acked
"""
DEDUPE_TTL_S = 3600


class SegmentProducer:
    """Appends segments to the stream, waiting while ``max_len`` are unacknowledged.

    A Redis that is down or restarting is waited out (retry with back-off), so the policy server holds its
    env streams instead of crashing; once ``append`` returns, the segment is in Redis (and, with append-only
    persistence, survives a restart of it).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        max_len: int,
        poll_s: float = 0.05,
        should_stop: Callable[[], bool] = lambda: False,
        give_up_s: float = 30.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.max_len = max_len
        self.poll_s = poll_s
        self.should_stop = should_stop
        # A stopping producer waits at most this long for Redis before giving a segment up (and saying so).
        self.give_up_s = give_up_s
        self.backpressure_s = 0.0
        self._append_script = client.register_script(_APPEND)

    def stream_length(self, should_stop: Callable[[], bool] | None = None) -> int:
        return int(retry(lambda: self.client.xlen(self.keys.stream), "XLEN", should_stop or self.should_stop))

    def append(self, segment: Segment) -> bytes | None:
        """XADD one segment (after waiting for room); returns its stream id (None if it was already stored).

        Raises a Redis connection error only when the producer is stopping and Redis stayed unreachable for
        ``give_up_s`` (at most 30 s) more: that segment was never stored, and the error says so.
        """
        msg = segment_to_proto(segment)
        payload = msg.SerializeToString()
        stopping_since: list[float] = []

        def stop_waiting() -> bool:  # keep trying while running; a stopping producer gets give_up_s more
            if not self.should_stop():
                return False
            stopping_since[:1] = stopping_since[:1] or [time.monotonic()]
            return time.monotonic() - stopping_since[0] > min(self.give_up_s, 30.0)

        keys = [self.keys.stream, self.keys.produced, f"{self.keys.prefix}:seen:{msg.segment_id}"]
        args = [payload, segment.policy_version, DEDUPE_TTL_S]
        try:
            waited_from = None
            while self.stream_length(stop_waiting) >= self.max_len and not self.should_stop():
                waited_from = waited_from or time.monotonic()
                time.sleep(self.poll_s)
            if waited_from is not None:
                self.backpressure_s += time.monotonic() - waited_from
            return retry(lambda: self._append_script(keys=keys, args=args), "XADD segment", stop_waiting)
        except TRANSIENT_ERRORS:
            log.error("segment %s of %s lost: redis unreachable while stopping", msg.segment_id, segment.env_key)
            raise


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
        # Delivered to the caller and not yet acknowledged: never handed out twice by a re-read.
        self._outstanding: set[bytes] = set()
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
        entries: list[StreamEntry] = []
        for entry_id, fields in items:
            if fields is None:  # deleted while pending
                self.client.xack(self.keys.stream, self.group, entry_id)
                continue
            try:
                msg = trajectory_pb2.TrajectorySegment.FromString(fields[SEGMENT_FIELD])
                entries.append(StreamEntry(entry_id, segment_from_proto(msg)))
            except (KeyError, DecodeError, SegmentDecodeError, ValueError) as exc:
                self._dead_letter(entry_id, fields, str(exc) or type(exc).__name__)
        self._outstanding.update(e.entry_id for e in entries)
        return entries

    def _dead_letter(self, entry_id: bytes, fields: dict, reason: str) -> None:
        log.error("segment %s is malformed (%s): moved to %s", entry_id, reason, self.keys.dead_letters)
        self._dead_letter_script(
            keys=[self.keys.stream, self.keys.dead_letters, self.keys.dropped],
            args=[self.group, entry_id, fields.get(SEGMENT_FIELD, b""), reason.encode()],
        )

    def acknowledge(self, consumed: Sequence[bytes], dropped: Sequence[bytes] = ()) -> None:
        """Mark entries done after an update used them (and drop stale ones), atomically; retried across a
        Redis restart (an entry whose acknowledgement never lands is re-read later: trained twice, not lost)."""
        ids = [*consumed, *dropped]
        if not ids:
            return
        retry(
            lambda: self._acknowledge_script(
                keys=[self.keys.stream, self.keys.consumed, self.keys.dropped],
                args=[self.group, len(consumed), *ids],
            ),
            "XACK segments",
            self.should_stop,
        )
        self._outstanding.difference_update(ids)


def read_counter(client: redis.Redis, key: str, give_up_s: float = 30.0) -> int:
    value = retry(lambda: client.get(key), f"GET {key}", give_up_s=give_up_s)
    return int(value) if value is not None else 0
