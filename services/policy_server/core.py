"""The policy server's logic, free of gRPC and Redis: validation, batched inference, segment assembly.

- ``validate_observations`` refuses malformed observations with a message (the edge maps it to
  INVALID_ARGUMENT) before they can reach the model.
- ``PolicyHost`` owns the model and its version; new weights wait in a slot and are swapped in
  between batches, so one batch never mixes two versions.
- ``InferenceBatcher`` merges requests from all env streams into batches of at most
  ``max_batch_size`` rows, waiting at most ``max_wait_s`` for a batch to fill.
- ``SegmentAssembler`` turns the per-step exchange of one env stream into trajectory segments.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from gsrl.policy import Policy
from gsrl.trajectory import EpisodeSummary, Segment

log = logging.getLogger(__name__)

ObservationSpec = Mapping[str, tuple[tuple[int, ...], str]]


class InvalidObservation(ValueError):
    """Observations do not match the task's spec; the message says which key and how."""


def validate_observations(
    observations: Mapping[str, torch.Tensor], spec: ObservationSpec, batch_size: int | None = None
) -> int:
    """Check keys, per-row shapes, dtypes and finiteness against ``spec``; returns the batch size."""
    missing = sorted(set(spec) - set(observations))
    extra = sorted(set(observations) - set(spec))
    if missing or extra:
        raise InvalidObservation(f"observation keys {sorted(observations)} do not match the task's {sorted(spec)}")
    for key, (shape, dtype) in spec.items():
        tensor = observations[key]
        if tuple(tensor.shape[1:]) != tuple(shape):
            raise InvalidObservation(
                f"observation '{key}' has shape {list(tensor.shape)}, expected [B, *{list(shape)}]"
            )
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise InvalidObservation(f"observation '{key}' has dtype {tensor.dtype}, expected {dtype}")
        rows = int(tensor.shape[0])
        if batch_size is None:
            batch_size = rows
        elif rows != batch_size:
            raise InvalidObservation(f"observation '{key}' has {rows} rows, expected {batch_size}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidObservation(f"observation '{key}' contains NaN or infinite values")
    if batch_size is None or batch_size < 1:
        raise InvalidObservation("observation batch is empty")
    return batch_size


class PolicyHost:
    """The served model, its version, and a slot for weights that arrive between batches."""

    def __init__(self, policy: Policy, version: int = 0, device: str | torch.device = "cpu") -> None:
        self.policy = policy.to(device).eval()
        self.device = torch.device(device)
        self.version = version
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None
        self._lock = threading.Lock()

    def offer_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Called from the weight receiver thread; the swap happens at the next batch."""
        with self._lock:
            if version > max(self.version, self._pending[1] if self._pending else -1):
                self._pending = (state_dict, version)

    def swap_if_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        state_dict, version = pending
        self.policy.load_state_dict(state_dict)
        self.version = version
        log.info("serving policy version %d", version)
        return True


@dataclass
class InferenceResult:
    action_chunk: torch.Tensor  # [B, C, A]
    logprobs: torch.Tensor  # [B]
    values: torch.Tensor  # [B]
    extra_values: torch.Tensor | None  # [B'] values of `value_observations`
    policy_version: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, ...] (PolicyOutput.extras)


@dataclass
class InferenceRequest:
    observations: dict[str, torch.Tensor]
    instructions: list[str]
    deterministic: bool = False
    # Extra rows that only need a value (pre-reset observations of truncated episodes), with their instructions
    # (a language-conditioned value depends on the prompt).
    value_observations: dict[str, torch.Tensor] | None = None
    value_instructions: list[str] | None = None
    # From a Rollout stream, which has at most one request in flight (an Act call has no such bound).
    from_stream: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: InferenceResult | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(next(iter(self.observations.values())).shape[0])


def _rows_of(tensors: dict[str, torch.Tensor]) -> int:
    return int(next(iter(tensors.values())).shape[0])


def _concat(maps: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.cat([m[k] for m in maps]).to(device) for k in maps[0]}


class InferenceBatcher:
    """One worker thread that serves all streams, so the model runs on full batches."""

    def __init__(self, host: PolicyHost, max_batch_size: int, max_wait_s: float, metrics: object | None = None):
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._queue: queue.Queue[InferenceRequest] = queue.Queue()
        self._open_streams = 0
        self._streams_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> InferenceBatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def stream_opened(self) -> None:
        """A Rollout stream started: one more source of at most one request at a time."""
        with self._streams_lock:
            self._open_streams += 1

    def stream_closed(self) -> None:
        with self._streams_lock:
            self._open_streams -= 1

    def submit(self, request: InferenceRequest, timeout_s: float | None = 60.0) -> InferenceResult:
        if self._stop.is_set():
            raise RuntimeError("inference batcher is stopped")
        self._queue.put(request)
        if not request.done.wait(timeout_s):
            raise TimeoutError(f"inference did not finish within {timeout_s}s")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _collect(self) -> list[InferenceRequest]:
        """The next batch: up to ``max_batch_size`` rows, waiting up to ``max_wait_s`` for more requests, but not
        once every open Rollout stream has its request in the batch: each stream has at most one request in flight,
        so none can come before this batch is answered, and waiting would only add latency (and idle env servers)."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, rows = [first], first.rows
        from_streams = int(first.from_stream)
        deadline = first.enqueued + self.max_wait_s
        while rows < self.max_batch_size:
            if from_streams >= self._open_streams > 0 and all(r.from_stream for r in batch):
                break
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            rows += item.rows
            from_streams += int(item.from_stream)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            self.host.swap_if_pending()
            for deterministic in (False, True):
                group = [r for r in batch if r.deterministic == deterministic]
                if group:
                    self._infer(group, deterministic)
        while not self._queue.empty():  # fail what is left so no caller waits forever
            request = self._queue.get_nowait()
            request.error = RuntimeError("policy server is shutting down")
            request.done.set()

    def _infer(self, group: list[InferenceRequest], deterministic: bool) -> None:
        started = time.monotonic()
        try:
            device = self.host.device
            observations = _concat([r.observations for r in group], device)
            instructions = [s for r in group for s in (r.instructions or [""] * r.rows)]
            with torch.no_grad():
                out = self.host.policy.act(observations, instructions, deterministic=deterministic)
                value_requests = [r for r in group if r.value_observations]
                extra = None
                if value_requests:
                    value_instructions = [
                        s
                        for r in value_requests
                        for s in (r.value_instructions or [""] * _rows_of(r.value_observations))
                    ]
                    value_observations = _concat([r.value_observations for r in value_requests], device)
                    extra = self.host.policy.value(value_observations, value_instructions).cpu()
        except Exception as exc:  # a model failure must reach every waiting stream, not kill the thread
            log.exception("inference failed")
            for request in group:
                request.error = exc
                request.done.set()
            return
        elapsed = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.batch_size.observe(sum(r.rows for r in group))
            self.metrics.inference_seconds.observe(elapsed)
        actions, logprobs, values = out.action_chunk.cpu(), out.logprobs.cpu(), out.values.cpu()
        out_extras = {k: v.cpu() for k, v in getattr(out, "extras", {}).items()}
        row = extra_row = 0
        for request in group:
            n = request.rows
            n_extra = int(next(iter(request.value_observations.values())).shape[0]) if request.value_observations else 0
            request.result = InferenceResult(
                action_chunk=actions[row : row + n].float(),
                logprobs=logprobs[row : row + n].float(),
                values=values[row : row + n].float(),
                extra_values=extra[extra_row : extra_row + n_extra].float() if n_extra else None,
                policy_version=self.host.version,
                extras={k: v[row : row + n] for k, v in out_extras.items()},
            )
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(started - request.enqueued)
            row += n
            extra_row += n_extra
            request.done.set()


@dataclass
class StepOutcome:
    """What one env stream reported for its last chunk, plus the inference done on the new observations."""

    observations: dict[str, torch.Tensor]  # [B, ...] current observations (after auto-reset)
    instructions: list[str]
    result: InferenceResult  # actions for `observations`, values of the final observations
    rewards: torch.Tensor | None = None  # [B]; None on the first report of a stream
    terminated: torch.Tensor | None = None  # [B] bool
    truncated: torch.Tensor | None = None  # [B] bool
    final_value_rows: torch.Tensor | None = None  # [B] long: row in result.extra_values, -1 if none
    episodes: dict[int, EpisodeSummary] = field(default_factory=dict)  # env index -> finished episode


@dataclass
class _Pending:
    observations: dict[str, torch.Tensor]
    instruction: str
    action_chunk: torch.Tensor
    logprob: float
    value: float
    policy_version: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Transition:
    pending: _Pending
    reward: float
    terminated: bool
    truncated: bool
    next_value: float


class SegmentAssembler:
    """Per-env buffers of one stream's transitions, cut into segments of ``segment_length``.

    A transition is complete when the report after its actions arrives: the report brings its
    reward and episode flags, and the inference on the new observation brings V(s_{t+1}).
    """

    def __init__(self, env_key_prefix: str, num_envs: int, segment_length: int) -> None:
        self.env_key_prefix = env_key_prefix
        self.num_envs = num_envs
        self.segment_length = segment_length
        self._pending: list[_Pending | None] = [None] * num_envs
        self._done: list[list[_Transition]] = [[] for _ in range(num_envs)]
        self._episodes: list[list[EpisodeSummary]] = [[] for _ in range(num_envs)]

    def record(self, step: StepOutcome) -> list[Segment]:
        """Complete the previous transitions with this report, start new ones; return full segments."""
        ready: list[Segment] = []
        result = step.result
        for env in range(self.num_envs):
            pending = self._pending[env]
            if pending is not None and step.rewards is not None:
                terminated = bool(step.terminated[env])
                truncated = bool(step.truncated[env]) and not terminated
                if terminated:
                    next_value = 0.0
                elif truncated:
                    row = int(step.final_value_rows[env]) if step.final_value_rows is not None else -1
                    if row < 0 or result.extra_values is None:
                        raise ValueError(f"env {env} was truncated but its final observation has no value")
                    next_value = float(result.extra_values[row])
                else:
                    next_value = float(result.values[env])
                self._done[env].append(
                    _Transition(pending, float(step.rewards[env]), terminated, truncated, next_value)
                )
                if env in step.episodes:
                    self._episodes[env].append(step.episodes[env])
                if len(self._done[env]) >= self.segment_length:
                    ready.append(self._cut(env))
            self._pending[env] = _Pending(
                observations={k: v[env] for k, v in step.observations.items()},
                instruction=step.instructions[env] if step.instructions else "",
                action_chunk=result.action_chunk[env],
                logprob=float(result.logprobs[env]),
                value=float(result.values[env]),
                policy_version=result.policy_version,
                extras={k: v[env] for k, v in result.extras.items()},
            )
        return ready

    def flush(self) -> list[Segment]:
        """Completed transitions that did not fill a segment (stream closing): kept, not lost.

        The last transition of each is marked truncated: the env's trajectory stops here for this
        stream (its env server may be scaled away), so GAE bootstraps from its ``next_value``.
        """
        self._pending = [None] * self.num_envs
        segments = []
        for env in range(self.num_envs):
            if self._done[env]:
                last = self._done[env][-1]
                last.truncated = last.truncated or not last.terminated
                segments.append(self._cut(env))
        return segments

    @property
    def buffered_transitions(self) -> int:
        return sum(len(d) for d in self._done)

    def _cut(self, env: int) -> Segment:
        transitions, self._done[env] = self._done[env], []
        episodes, self._episodes[env] = self._episodes[env], []
        pendings = [t.pending for t in transitions]
        return Segment(
            observations={k: torch.stack([p.observations[k] for p in pendings]) for k in pendings[0].observations},
            action_chunks=torch.stack([p.action_chunk for p in pendings]).float(),
            logprobs=torch.tensor([p.logprob for p in pendings], dtype=torch.float32),
            values=torch.tensor([p.value for p in pendings], dtype=torch.float32),
            rewards=torch.tensor([t.reward for t in transitions], dtype=torch.float32),
            terminated=torch.tensor([t.terminated for t in transitions], dtype=torch.bool),
            truncated=torch.tensor([t.truncated for t in transitions], dtype=torch.bool),
            next_values=torch.tensor([t.next_value for t in transitions], dtype=torch.float32),
            policy_versions=torch.tensor([p.policy_version for p in pendings], dtype=torch.int64),
            instructions=[p.instruction for p in pendings],
            episodes=episodes,
            extras={k: torch.stack([p.extras[k] for p in pendings]) for k in pendings[0].extras},
            segment_id=uuid.uuid4().hex,
            env_key=f"{self.env_key_prefix}/{env}",
            created_unix=time.time(),
        )
