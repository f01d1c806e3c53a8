"""Trajectory segments <-> the Redis stream that connects policy servers to learners.

Producers (policy servers) append ``gsrl.v1.TrajectorySegment`` protobufs with XADD and wait while
the stream holds ``max_stream_len`` unacknowledged segments (back-pressure instead of trimming,
so nothing accepted is ever thrown away). Learners read with a consumer group, acknowledge an
entry (XACK + XDEL) only after an update used it, and count segments dropped for policy lag.
A restarted learner rank re-reads its own pending entries first, so a crash loses nothing.
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


class SegmentProducer:
    """Appends segments to the stream, waiting while ``max_len`` are unacknowledged."""

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        max_len: int,
        poll_s: float = 0.05,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.keys = keys
        self.max_len = max_len
        self.poll_s = poll_s
        self.should_stop = should_stop
        self.backpressure_s = 0.0

    def stream_length(self) -> int:
        return int(self.client.xlen(self.keys.stream))

    def append(self, segment: Segment) -> bytes:
        """XADD one segment (after waiting for room); returns its stream id."""
        payload = segment_to_proto(segment).SerializeToString()
        waited_from = None
        while self.stream_length() >= self.max_len and not self.should_stop():
            waited_from = waited_from or time.monotonic()
            time.sleep(self.poll_s)
        if waited_from is not None:
            self.backpressure_s += time.monotonic() - waited_from
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.stream, {SEGMENT_FIELD: payload, b"v": segment.policy_version})
        pipe.incr(self.keys.produced)
        entry_id, _ = pipe.execute()
        return entry_id


@dataclass
class StreamEntry:
    entry_id: bytes
    segment: Segment


class SegmentConsumer:
    """One learner rank's view of the stream: a named consumer in a consumer group."""

    def __init__(self, client: redis.Redis, keys: StreamKeys, group: str, consumer: str) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        # After a restart, this consumer's unacknowledged entries are replayed from this cursor first.
        self._pending_cursor: bytes | None = b"0"
        self.ensure_group()

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int) -> list[StreamEntry]:
        """Up to ``count`` entries: first this consumer's unacknowledged ones (after a restart), then new ones.

        Entries that do not decode are moved to the dead-letter stream and acknowledged, so one bad
        producer cannot stall the learners.
        """
        if self._pending_cursor is not None:
            entries, last_id = self._xread(self._pending_cursor, count, None)
            if last_id is not None:
                self._pending_cursor = last_id
                if entries:
                    log.info("re-reading %d unacknowledged segments of consumer %s", len(entries), self.consumer)
                    return entries
            else:
                self._pending_cursor = None
        return self._xread(">", count, block_ms)[0]

    def _xread(self, start: str | bytes, count: int, block_ms: int | None) -> tuple[list[StreamEntry], bytes | None]:
        """Decoded entries, and the id of the last entry the reply held (None when it held none)."""
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.keys.stream: start}, count=count, block=block_ms
        )
        entries: list[StreamEntry] = []
        last_id = None
        for _stream, items in reply or []:
            for entry_id, fields in items:
                last_id = entry_id
                if fields is None:  # deleted while pending
                    self.client.xack(self.keys.stream, self.group, entry_id)
                    continue
                try:
                    msg = trajectory_pb2.TrajectorySegment.FromString(fields[SEGMENT_FIELD])
                    entries.append(StreamEntry(entry_id, segment_from_proto(msg)))
                except (KeyError, DecodeError, SegmentDecodeError, ValueError) as exc:
                    self._dead_letter(entry_id, fields, str(exc))
        return entries, last_id

    def _dead_letter(self, entry_id: bytes, fields: dict, reason: str) -> None:
        log.error("segment %s is malformed (%s): moved to %s", entry_id, reason, self.keys.dead_letters)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.dead_letters, {**fields, b"reason": reason.encode()}, maxlen=1000, approximate=True)
        pipe.xack(self.keys.stream, self.group, entry_id)
        pipe.xdel(self.keys.stream, entry_id)
        pipe.incr(self.keys.dropped)
        pipe.execute()

    def acknowledge(self, consumed: Sequence[bytes], dropped: Sequence[bytes] = ()) -> None:
        """Mark entries done after an update used them (and drop stale ones), in one transaction."""
        ids = [*consumed, *dropped]
        if not ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.stream, self.group, *ids)
        pipe.xdel(self.keys.stream, *ids)
        if consumed:
            pipe.incrby(self.keys.consumed, len(consumed))
        if dropped:
            pipe.incrby(self.keys.dropped, len(dropped))
        pipe.execute()


def read_counter(client: redis.Redis, key: str) -> int:
    value = client.get(key)
    return int(value) if value is not None else 0
