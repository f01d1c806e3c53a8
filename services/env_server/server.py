"""The env server's edge: Rollout streams to a policy server, reconnecting when they break.

Per stream the exchange is strictly alternating: send a StepReport, receive the ActionBatch for it, execute the
chunk in an ``EnvBatch``, report again. With one stage (the default) physics and inference therefore take turns and
neither overlaps the other. With ``pipeline_stages`` K > 1 the envs are split into K batches, each with its own
Rollout stream (id ``<env server id>-s<k>``, so the policy server assembles each stage's segments as it does for
any stream): while the policy server infers for one stage, this process steps another stage's actions. One thread
steps every stage, in the order their actions arrive (ManiSkill's CPU physics holds the GIL, so stepping stages
on several threads would not run faster; measured 0.95x with two threads); a small reader thread per stream only
hands its ActionBatches over.

On a broken stream the envs keep their state; all K streams are closed and reopened together (one env server,
one policy server connection), each new stream starting with a report of its stage's current observations, and
the policy server flushes what it had. With several policy servers configured, each reconnect goes to the next
one in turn. An ActionBatch that is malformed (wrong shape or dtype, NaN/Inf) is never stepped: the streams are
dropped and reopened.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from gsrl import codec
from gsrl.config import TLSConfig, split_addresses
from gsrl.metrics import EnvServerMetrics
from gsrl.tls import open_channel
from gsrl.v1 import rollout_pb2, rollout_pb2_grpc
from services.env_server.core import ChunkResult, EnvBatch
from services.env_server.recorder import EpisodeRecorder

log = logging.getLogger(__name__)

_CLOSE = object()


class InvalidActions(ValueError):
    """The policy server sent an ActionBatch this env batch must not execute."""


def check_action_chunk(message: rollout_pb2.ActionBatch, num_envs: int, chunk: int, action_dim: int) -> np.ndarray:
    """Decode and check an ActionBatch: float32 [num_envs, chunk, action_dim], all finite."""
    try:
        actions = codec.to_numpy(message.action_chunk, "action_chunk")
    except codec.TensorDecodeError as exc:
        raise InvalidActions(str(exc)) from exc
    if actions.dtype != np.float32:
        raise InvalidActions(f"action_chunk has dtype {actions.dtype}, expected float32")
    if actions.shape != (num_envs, chunk, action_dim):
        raise InvalidActions(
            f"action_chunk has shape {list(actions.shape)}, expected [{num_envs}, {chunk}, {action_dim}]"
        )
    if not np.isfinite(actions).all():
        raise InvalidActions("action_chunk contains NaN or infinite values")
    return actions


def observation_batch(observations: dict[str, np.ndarray], instructions: list[str]) -> rollout_pb2.ObservationBatch:
    return rollout_pb2.ObservationBatch(tensors=codec.encode_map(observations), instructions=instructions)


def step_report(step_id: int, result: ChunkResult, instructions: list[str]) -> rollout_pb2.StepReport:
    report = rollout_pb2.StepReport(
        step_id=step_id,
        observations=observation_batch(result.observations, instructions),
        rewards=codec.encode(result.rewards.astype(np.float32)),
        step_rewards=codec.encode(result.step_rewards.astype(np.float32)),
        terminated=codec.encode(result.terminated.astype(bool)),
        truncated=codec.encode(result.truncated.astype(bool)),
        episode_return=codec.encode(result.episode_return.astype(np.float32)),
        episode_length=codec.encode(result.episode_length.astype(np.int32)),
        episode_success_once=codec.encode(result.episode_success_once.astype(bool)),
        env_steps=int(result.steps_executed),
    )
    if bool((result.terminated | result.truncated).any()):
        report.final_observations.CopyFrom(observation_batch(result.final_observations, []))
    return report


class _Unavailable(grpc.RpcError):
    """A policy server address that did not accept a connection in time (so the next one is tried)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


@dataclass
class _Stage:
    """One pipeline stage: a batch of envs and, while connected, its Rollout stream."""

    index: int
    batch: EnvBatch
    stream_id: str
    observations: dict[str, np.ndarray]
    outgoing: queue.Queue = field(default_factory=queue.Queue)
    call: grpc.Future | None = None
    reader: threading.Thread | None = None
    sent_at: float = 0.0


class EnvServer:
    """Drives one ``EnvBatch`` per pipeline stage from a policy server over gRPC until ``stop`` is set.

    ``batch`` is one ``EnvBatch`` (no pipelining) or a sequence of K batches, the stages; with K > 1 stage k's
    stream announces itself as ``<env_server_id>-s<k>``. ``recorder`` records env 0 of the first stage.
    """

    def __init__(
        self,
        batch: EnvBatch | Sequence[EnvBatch],
        address: str | list[str],
        env_server_id: str,
        task_id: str,
        action_chunk: int,
        metrics: EnvServerMetrics | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        log_every_s: float = 30.0,
        tls: TLSConfig | None = None,
        max_message_bytes: int = 64 << 20,
        recorder: EpisodeRecorder | None = None,
    ) -> None:
        batches = list(batch) if isinstance(batch, list | tuple) else [batch]
        if not batches:
            raise ValueError("an env server needs at least one env batch")
        self.recorder = recorder
        # Policy servers to try in turn; a "dns:///" entry lets gRPC balance over every address it resolves to.
        self.addresses = split_addresses(address) if isinstance(address, str) else list(address)
        self._next_address = 0
        self.address = self.addresses[0]
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.env_server_id = env_server_id
        self.task_id = task_id
        self.action_chunk = action_chunk
        self.metrics = metrics or EnvServerMetrics()
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.log_every_s = log_every_s
        self.stop_event = threading.Event()
        self._active_calls: list[grpc.Future] = []
        self._calls_lock = threading.Lock()
        self.total_steps = 0
        self.episodes = 0
        # Seconds the stepping thread spent waiting for actions (no stage had any): what pipelining shrinks.
        self.idle_seconds = 0.0
        self.recent_success: deque[bool] = deque(maxlen=100)
        self.stages = [
            _Stage(k, b, env_server_id if len(batches) == 1 else f"{env_server_id}-s{k}", b.reset())
            for k, b in enumerate(batches)
        ]
        if recorder is not None:
            recorder.start(self.stages[0].observations)

    @property
    def num_envs(self) -> int:
        """Envs over all stages."""
        return sum(stage.batch.num_envs for stage in self.stages)

    def run(self) -> None:
        """Serve until stopped, reopening the stream with exponential back-off after failures."""
        backoff = self.backoff_s
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.address = self.addresses[self._next_address % len(self.addresses)]
            self._next_address += 1
            try:
                with open_channel(self.address, self.tls, self.max_message_bytes) as channel:
                    if not self._wait_ready(channel):
                        return
                    self._stream(channel)
                if self.stop_event.is_set():
                    return
                log.warning("policy server %s closed the rollout stream; reconnecting", self.address)
                self.metrics.reconnects.inc()
            except grpc.RpcError as exc:
                if self.stop_event.is_set():
                    return
                code = exc.code() if hasattr(exc, "code") else None
                log.warning(
                    "rollout stream to %s broke (%s: %s); reconnecting in %.1fs",
                    self.address,
                    code,
                    exc.details() if hasattr(exc, "details") else exc,
                    backoff,
                )
                self.metrics.reconnects.inc()
            except InvalidActions as exc:
                log.error(
                    "policy server %s sent a malformed ActionBatch (%s): not stepped; reconnecting", self.address, exc
                )
                self.metrics.reconnects.inc()
            if time.monotonic() - started > 10 * self.backoff_s:
                backoff = self.backoff_s  # it had been running fine: start the back-off over
            if len(self.addresses) > 1 and self._next_address % len(self.addresses) != 0:
                backoff_now = min(self.backoff_s, backoff)  # another server is worth trying at once
            else:
                backoff_now = backoff
            if self.stop_event.wait(backoff_now):
                return
            if backoff_now == backoff:
                backoff = min(backoff * 2, self.max_backoff_s)

    def stop(self) -> None:
        """Stop serving; also cancels the open streams, which may be waiting on a back-pressured policy server."""
        self.stop_event.set()
        with self._calls_lock:
            calls = list(self._active_calls)
        for call in calls:
            call.cancel()

    def _wait_ready(self, channel: grpc.Channel) -> bool:
        """Block until the policy server accepts connections; False if stopped meanwhile.

        With several addresses, give up on this one after a few seconds (raised as UNAVAILABLE) so the next
        is tried; with one, wait as long as it takes.
        """
        ready = grpc.channel_ready_future(channel)
        waited = 0.0
        while not self.stop_event.is_set():
            try:
                ready.result(timeout=1.0)
                return True
            except grpc.FutureTimeoutError:
                waited += 1.0
                if len(self.addresses) > 1 and waited >= 3:
                    ready.cancel()
                    raise _Unavailable(f"{self.address} not reachable within {waited:.0f}s") from None
                if waited % 30 == 0:
                    log.info("waiting for the policy server at %s (%.0fs)", self.address, waited)
        return False

    def _stream(self, channel: grpc.Channel) -> None:
        """Open every stage's stream, then step whichever stage's actions arrive, until one stream ends or fails."""
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        # (stage index, ActionBatch response | exception | _CLOSE, arrival time); local to this connection, so
        # nothing of a torn-down stream can reach the next one.
        arrivals: queue.Queue[tuple[int, object, float]] = queue.Queue()
        try:
            for stage in self.stages:
                self._open(stub, stage, arrivals)
            if self.stop_event.is_set():  # stop() ran before the calls were registered
                return
            last_log, steps_at_log = time.monotonic(), self.total_steps
            while not self.stop_event.is_set():
                waiting = time.monotonic()
                try:
                    k, item, arrived = arrivals.get(timeout=1.0)
                except queue.Empty:
                    continue
                finally:
                    self.idle_seconds += time.monotonic() - waiting
                if self.stop_event.is_set():
                    return
                if item is _CLOSE:
                    return  # the policy server ended this stage's stream: reopen them all
                if isinstance(item, BaseException):
                    raise item
                self._step(self.stages[k], item, arrived)
                now = time.monotonic()
                if now - last_log >= self.log_every_s:
                    self._log_progress((self.total_steps - steps_at_log) / (now - last_log))
                    last_log, steps_at_log = now, self.total_steps
        finally:
            with self._calls_lock:
                self._active_calls = []
            for stage in self.stages:
                stage.outgoing.put(_CLOSE)
                if stage.call is not None:
                    stage.call.cancel()
            for stage in self.stages:
                if stage.reader is not None:
                    stage.reader.join(timeout=5.0)
                stage.call, stage.reader, stage.outgoing = None, None, queue.Queue()

    def _open(self, stub: rollout_pb2_grpc.PolicyServiceStub, stage: _Stage, arrivals: queue.Queue) -> None:
        """Start ``stage``'s Rollout stream (hello, then its current observations) and the thread that reads it."""
        outgoing = stage.outgoing

        def requests() -> Iterator[rollout_pb2.RolloutRequest]:
            while True:
                item = outgoing.get()
                if item is _CLOSE:
                    return
                yield item

        outgoing.put(
            rollout_pb2.RolloutRequest(
                hello=rollout_pb2.RolloutHello(
                    env_server_id=stage.stream_id,
                    task=self.task_id,
                    num_envs=stage.batch.num_envs,
                    action_dim=stage.batch.action_dim,
                    action_chunk=self.action_chunk,
                )
            )
        )
        outgoing.put(
            rollout_pb2.RolloutRequest(
                step=rollout_pb2.StepReport(
                    step_id=0, observations=observation_batch(stage.observations, stage.batch.instructions)
                )
            )
        )
        stage.sent_at = time.monotonic()
        responses = stub.Rollout(requests())
        stage.call = responses
        with self._calls_lock:
            self._active_calls.append(responses)

        def read() -> None:
            try:
                for response in responses:
                    arrivals.put((stage.index, response, time.monotonic()))
                arrivals.put((stage.index, _CLOSE, time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - handed to the stepping thread, which raises it there
                arrivals.put((stage.index, exc, time.monotonic()))

        stage.reader = threading.Thread(target=read, name=f"rollout-reader-{stage.index}", daemon=True)
        stage.reader.start()

    def _step(self, stage: _Stage, response: rollout_pb2.RolloutResponse, arrived: float) -> None:
        """Execute one ActionBatch on ``stage``'s envs and send the report of what happened."""
        self.metrics.roundtrip_seconds.observe(arrived - stage.sent_at)
        batch = stage.batch
        actions = check_action_chunk(response.actions, batch.num_envs, self.action_chunk, batch.action_dim)
        self.metrics.policy_version.set(response.actions.policy_version)
        chunk_started = time.monotonic()
        result = batch.step_chunk(actions)
        self.metrics.chunk_seconds.observe(time.monotonic() - chunk_started)
        self._account(result)
        if self.recorder is not None and stage.index == 0:
            self.recorder.record(result)
        stage.observations = result.observations
        stage.outgoing.put(
            rollout_pb2.RolloutRequest(step=step_report(response.actions.step_id, result, batch.instructions))
        )
        stage.sent_at = time.monotonic()

    def _log_progress(self, rate: float) -> None:
        success = np.mean(self.recent_success) if self.recent_success else float("nan")
        log.info(
            "%s: %d steps (%.1f steps/s), %d episodes, success_once %.2f (last %d)",
            self.env_server_id,
            self.total_steps,
            rate,
            self.episodes,
            success,
            len(self.recent_success),
        )

    def _account(self, result: ChunkResult) -> None:
        self.total_steps += int(result.steps_executed)
        self.metrics.steps.inc(int(result.steps_executed))
        ended = np.flatnonzero(result.terminated | result.truncated)
        for env in ended:
            success = bool(result.episode_success_once[env])
            self.episodes += 1
            self.recent_success.append(success)
            self.metrics.episodes.labels("success" if success else "failure").inc()
            self.metrics.episode_return.set(float(result.episode_return[env]))
        if len(ended):
            self.metrics.success_rate.set(float(np.mean(self.recent_success)))
