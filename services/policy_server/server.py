"""The policy server's edges: the gRPC servicer, the Redis stream producer and the weight subscriber.

A Redis restart does not stop it: the producer waits Redis out (the env streams it serves wait with it,
back-pressure), and the loop that publishes counters retries.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures

import grpc
import redis
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gsrl import codec
from gsrl.config import Config, TLSConfig
from gsrl.env_spec import EnvSpec, probe_env_spec
from gsrl.metrics import MetricsServer, PolicyServerMetrics
from gsrl.policy import build_configured_policy
from gsrl.redis_conn import connect, is_transient
from gsrl.stream import SegmentProducer, StreamKeys
from gsrl.tls import add_port, message_options
from gsrl.trajectory import EpisodeSummary
from gsrl.v1 import rollout_pb2, rollout_pb2_grpc
from gsrl.weights import WeightSubscriber
from services.policy_server.core import (
    InferenceBatcher,
    InferenceRequest,
    InvalidObservation,
    PolicyHost,
    SegmentAssembler,
    StepOutcome,
    validate_observations,
)

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 5
SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def _rows(tensor: torch.Tensor, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if tuple(tensor.shape) != (rows,):
        raise InvalidObservation(f"'{name}' has shape {list(tensor.shape)}, expected [{rows}]")
    if tensor.dtype != dtype:
        raise InvalidObservation(f"'{name}' has dtype {tensor.dtype}, expected {dtype}")
    return tensor


class PolicyServicer(rollout_pb2_grpc.PolicyServiceServicer):
    """Serves Rollout streams and Act calls from one batcher; segments go to ``producer``."""

    def __init__(
        self,
        batcher: InferenceBatcher,
        spec: EnvSpec,
        action_chunk: int,
        segment_length: int,
        producer: SegmentProducer | None,
        metrics: PolicyServerMetrics,
        task_id: str,
    ) -> None:
        self.batcher = batcher
        self.spec = spec
        self.action_chunk = action_chunk
        self.segment_length = segment_length
        self.producer = producer
        self.metrics = metrics
        self.task_id = task_id
        # Env steps reported by all streams (one handler thread each); the serve loop publishes the total.
        self.env_steps = 0
        self._env_steps_lock = threading.Lock()

    def _invalid(self, context: grpc.ServicerContext, rpc: str, message: str) -> None:
        self.metrics.invalid_requests.labels(rpc).inc()
        log.warning("%s: refused malformed request: %s", rpc, message)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def Rollout(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        first = next(request_iterator, None)
        if first is None:
            return
        if not first.HasField("hello"):
            self._invalid(context, "Rollout", "the first message of a Rollout stream must be a RolloutHello")
        hello = first.hello
        problem = self._check_hello(hello)
        if problem:
            self._invalid(context, "Rollout", problem)
        assembler = SegmentAssembler(hello.env_server_id or "env", hello.num_envs, self.segment_length)
        self.metrics.streams.inc()
        self.batcher.stream_opened()
        log.info("env server %s connected (%d envs)", hello.env_server_id, hello.num_envs)
        try:
            for request in request_iterator:
                if not request.HasField("step"):
                    self._invalid(context, "Rollout", "after the hello, every message must be a StepReport")
                try:
                    outcome = self._decode_step(request.step, hello.num_envs)
                except (InvalidObservation, codec.TensorDecodeError) as exc:
                    self._invalid(context, "Rollout", str(exc))
                self.metrics.requests.labels("Rollout").inc()
                with self._env_steps_lock:
                    self.env_steps += request.step.env_steps
                self._append_all(assembler.record(outcome))
                if outcome.rewards is not None:
                    self.metrics.transitions.inc(hello.num_envs)
                yield rollout_pb2.RolloutResponse(
                    actions=rollout_pb2.ActionBatch(
                        step_id=request.step.step_id + 1,
                        action_chunk=codec.encode(outcome.result.action_chunk),
                        policy_version=outcome.result.policy_version,
                    )
                )
        finally:
            self.metrics.streams.dec()
            self.batcher.stream_closed()
            leftovers = assembler.flush()
            for segment in leftovers:
                try:
                    self._append(segment)
                except Exception:  # noqa: BLE001 - logged by the producer; the other leftovers still go out
                    log.exception("env server %s: a partial segment could not be stored", hello.env_server_id)
            log.info("env server %s disconnected; flushed %d partial segments", hello.env_server_id, len(leftovers))

    def _check_hello(self, hello: rollout_pb2.RolloutHello) -> str | None:
        if hello.task and hello.task != self.task_id:
            return f"this policy server serves task '{self.task_id}', not '{hello.task}'"
        if hello.num_envs < 1:
            return "hello.num_envs must be >= 1"
        if hello.action_dim != self.spec.action_dim:
            return f"hello.action_dim is {hello.action_dim}, the policy acts in {self.spec.action_dim} dims"
        if hello.action_chunk and hello.action_chunk != self.action_chunk:
            return f"hello.action_chunk is {hello.action_chunk}, the policy emits chunks of {self.action_chunk}"
        return None

    def _append(self, segment) -> None:
        self._append_all([segment])

    def _append_all(self, segments: list) -> None:
        """Store the segments one report completed in one round trip (all envs of a stream complete together)."""
        if self.producer is None or not segments:
            return
        waited = self.producer.backpressure_s
        self.producer.append_many(segments)
        self.metrics.segments.inc(len(segments))
        self.metrics.backpressure_seconds.inc(self.producer.backpressure_s - waited)

    def _decode_step(self, step: rollout_pb2.StepReport, num_envs: int) -> StepOutcome:
        observations = codec.decode_map_torch(step.observations.tensors, "observations/")
        validate_observations(observations, self.spec.observation_spec, num_envs)
        instructions = list(step.observations.instructions)
        if instructions and len(instructions) != num_envs:
            raise InvalidObservation(f"{len(instructions)} instructions for {num_envs} envs")
        outcome = StepOutcome(observations=observations, instructions=instructions, result=None)  # type: ignore[arg-type]
        value_observations = None
        value_instructions = None
        if step.HasField("rewards"):
            outcome.rewards = _rows(codec.to_torch(step.rewards, "rewards"), "rewards", num_envs, torch.float32)
            if not bool(torch.isfinite(outcome.rewards).all()):
                raise InvalidObservation("'rewards' contains NaN or infinite values")
            outcome.terminated = _rows(
                codec.to_torch(step.terminated, "terminated"), "terminated", num_envs, torch.bool
            )
            outcome.truncated = _rows(codec.to_torch(step.truncated, "truncated"), "truncated", num_envs, torch.bool)
            truncated = outcome.truncated & ~outcome.terminated
            if bool(truncated.any()):
                final = codec.decode_map_torch(step.final_observations.tensors, "final_observations/")
                validate_observations(final, self.spec.observation_spec, num_envs)
                idx = truncated.nonzero().flatten()
                value_observations = {k: v[idx] for k, v in final.items()}
                value_instructions = [instructions[i] for i in idx.tolist()] if instructions else None
                rows = torch.full((num_envs,), -1, dtype=torch.long)
                rows[idx] = torch.arange(len(idx))
                outcome.final_value_rows = rows
            ended = (outcome.terminated | outcome.truncated).nonzero().flatten().tolist()
            if ended:
                ret = codec.to_torch(step.episode_return, "episode_return")
                length = codec.to_torch(step.episode_length, "episode_length")
                success = codec.to_torch(step.episode_success_once, "episode_success_once")
                for name, t in (("episode_return", ret), ("episode_length", length), ("episode_success_once", success)):
                    if t.shape[0] != num_envs:
                        raise InvalidObservation(f"'{name}' has shape {list(t.shape)}, expected [{num_envs}]")
                outcome.episodes = {i: EpisodeSummary(float(ret[i]), int(length[i]), bool(success[i])) for i in ended}
        outcome.result = self.batcher.submit(
            InferenceRequest(
                observations,
                instructions,
                value_observations=value_observations,
                value_instructions=value_instructions,
                from_stream=True,
            )
        )
        return outcome

    def Act(self, request: rollout_pb2.ActRequest, context):  # noqa: N802 (gRPC method name)
        try:
            observation = codec.decode_map_torch(request.observation, "observation/")
            batched = {k: v.unsqueeze(0) for k, v in observation.items()}
            validate_observations(batched, self.spec.observation_spec, 1)
        except (InvalidObservation, codec.TensorDecodeError) as exc:
            self._invalid(context, "Act", str(exc))
        self.metrics.requests.labels("Act").inc()
        instruction = request.instruction or self.spec.instruction
        result = self.batcher.submit(InferenceRequest(batched, [instruction], deterministic=request.deterministic))
        return rollout_pb2.ActResponse(
            action_chunk=codec.encode(result.action_chunk[0]),
            policy_version=result.policy_version,
            value=float(result.values[0]),
        )


def build_grpc_server(
    servicer: PolicyServicer,
    address: str,
    max_workers: int = 64,
    tls: TLSConfig | None = None,
    max_message_bytes: int = 64 << 20,
) -> tuple[grpc.Server, int]:
    """A gRPC server with the policy service, health and reflection; returns it and its bound port.

    Each Rollout stream holds a worker thread while it is open, so ``max_workers`` bounds the env servers
    one policy server can serve at once. Messages over ``max_message_bytes`` fail with RESOURCE_EXHAUSTED.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=message_options(max_message_bytes),
    )
    rollout_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, address, tls)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server, port


def serve(config: Config, redis_url: str, server_id: str | None = None, stop_event: threading.Event | None = None):
    """Run a policy server until SIGTERM/SIGINT (or ``stop_event``): the process entry point's body."""
    ps = config.policy_server
    server_id = server_id or f"policy-{socket.gethostname()}-{ps.port}"
    spec = probe_env_spec(config.task)
    torch.manual_seed(config.run.seed)
    policy = build_configured_policy(config.policy, spec.observation_spec, spec.action_dim)
    host = PolicyHost(policy, version=0, device=ps.device)
    metrics = PolicyServerMetrics()
    client = connect(redis_url, config.redis.password)
    keys = StreamKeys(config.redis.key_prefix, config.redis.stream)
    stop = stop_event or threading.Event()
    producer = SegmentProducer(client, keys, config.redis.max_stream_len, should_stop=stop.is_set)

    def on_weights(state_dict: dict[str, torch.Tensor], version: int) -> None:
        host.offer_weights(state_dict, version)
        metrics.weight_swaps.inc()

    subscriber = WeightSubscriber(
        client,
        server_id,
        template=policy.state_dict(),
        on_weights=on_weights,
        key_prefix=config.redis.key_prefix,
        device=host.device,  # the backend follows the learner's broadcast group (gloo or NCCL)
        timeout_s=config.learner.broadcast_timeout_s,
    )
    initial = subscriber.start()
    host.swap_if_pending()
    log.info("policy server %s starts with weights version %s", server_id, initial if initial is not None else 0)
    batcher = InferenceBatcher(host, ps.max_batch_size, ps.max_wait_ms / 1000.0, metrics).start()
    servicer = PolicyServicer(
        batcher, spec, config.policy.action_chunk, ps.segment_length, producer, metrics, config.task.id
    )
    server, port = build_grpc_server(
        servicer, f"{ps.host}:{ps.port}", tls=config.tls, max_message_bytes=ps.max_message_bytes
    )
    metrics_server = MetricsServer(metrics.registry, ps.metrics_port).start() if ps.metrics_port else None
    server.start()
    if metrics_server:
        metrics_server.ready.set()
    log.info("policy server %s listening on %s:%d", server_id, ps.host, port)

    def _shutdown(signum: int, _frame: object) -> None:
        log.info("signal %d: draining", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _shutdown)
        signal.signal(signal.SIGINT, _shutdown)
    published_steps = 0
    try:
        while not stop.wait(1.0):
            metrics.policy_version.set(host.version)
            try:
                metrics.stream_length.set(int(client.xlen(keys.stream)))
                steps = servicer.env_steps
                if steps > published_steps:
                    client.incrby(keys.env_steps, steps - published_steps)
                    published_steps = steps
            except redis.RedisError as exc:
                if not is_transient(exc):
                    raise
                log.warning("redis unavailable (%s); counters are published when it is back", exc)
    finally:
        server.health_servicer.enter_graceful_shutdown()  # type: ignore[attr-defined]
        # Bounded: a handler blocked on a stream whose request failed to deserialize can keep grpc's
        # shutdown event from ever being set; every RPC is cancelled after the grace period anyway.
        if not server.stop(grace=SHUTDOWN_GRACE_S).wait(timeout=SHUTDOWN_GRACE_S + 10):
            log.warning("gRPC shutdown did not finish %ds after the grace period; exiting anyway", 10)
        batcher.stop()
        subscriber.stop()
        if metrics_server:
            metrics_server.stop()
        client.close()
        log.info("policy server %s stopped", server_id)
