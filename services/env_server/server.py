"""The env server's edge: one Rollout stream to a policy server, reconnecting when it breaks.

The loop is strictly alternating: send a StepReport, receive the ActionBatch for it, execute the
chunk in ``EnvBatch``, report again. On a broken stream the envs keep their state; the new stream
starts with a report of the current observations, and the policy server flushes what it had.
With several policy servers configured, each reconnect goes to the next one in turn. An ActionBatch
that is malformed (wrong shape or dtype, NaN/Inf) is never stepped: the stream is dropped and reopened.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator

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


class EnvServer:
    """Drives one ``EnvBatch`` from a policy server over gRPC until ``stop`` is set."""

    def __init__(
        self,
        batch: EnvBatch,
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
        self.batch = batch
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
        self._active_call: grpc.Future | None = None
        self.total_steps = 0
        self.episodes = 0
        self.recent_success: deque[bool] = deque(maxlen=100)
        self._observations = batch.reset()
        if recorder is not None:
            recorder.start(self._observations)

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
        """Stop serving; also cancels the open stream, which may be waiting on a back-pressured policy server."""
        self.stop_event.set()
        call = self._active_call
        if call is not None:
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
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        outgoing: queue.Queue = queue.Queue()

        def requests() -> Iterator[rollout_pb2.RolloutRequest]:
            while True:
                item = outgoing.get()
                if item is _CLOSE:
                    return
                yield item

        outgoing.put(
            rollout_pb2.RolloutRequest(
                hello=rollout_pb2.RolloutHello(
                    env_server_id=self.env_server_id,
                    task=self.task_id,
                    num_envs=self.batch.num_envs,
                    action_dim=self.batch.action_dim,
                    action_chunk=self.action_chunk,
                )
            )
        )
        outgoing.put(
            rollout_pb2.RolloutRequest(
                step=rollout_pb2.StepReport(
                    step_id=0, observations=observation_batch(self._observations, self.batch.instructions)
                )
            )
        )
        responses = stub.Rollout(requests())
        self._active_call = responses
        sent_at = time.monotonic()
        last_log, steps_at_log = time.monotonic(), self.total_steps
        try:
            for response in responses:
                self.metrics.roundtrip_seconds.observe(time.monotonic() - sent_at)
                if self.stop_event.is_set():
                    break
                actions = check_action_chunk(
                    response.actions, self.batch.num_envs, self.action_chunk, self.batch.action_dim
                )
                self.metrics.policy_version.set(response.actions.policy_version)
                chunk_started = time.monotonic()
                result = self.batch.step_chunk(actions)
                self.metrics.chunk_seconds.observe(time.monotonic() - chunk_started)
                self._account(result)
                if self.recorder is not None:
                    self.recorder.record(result)
                self._observations = result.observations
                outgoing.put(
                    rollout_pb2.RolloutRequest(
                        step=step_report(response.actions.step_id, result, self.batch.instructions)
                    )
                )
                sent_at = time.monotonic()
                now = time.monotonic()
                if now - last_log >= self.log_every_s:
                    rate = (self.total_steps - steps_at_log) / (now - last_log)
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
                    last_log, steps_at_log = now, self.total_steps
        finally:
            self._active_call = None
            outgoing.put(_CLOSE)
            responses.cancel()

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
