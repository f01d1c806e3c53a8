"""The policy server over real gRPC on loopback, with a real Redis: streams, Act, errors, health, reflection."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gsrl import codec
from gsrl.env_spec import EnvSpec
from gsrl.metrics import PolicyServerMetrics
from gsrl.policy import build_policy
from gsrl.stream import SegmentConsumer, SegmentProducer, StreamKeys, read_counter
from gsrl.v1 import rollout_pb2, rollout_pb2_grpc, tensor_pb2
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import SERVICE_NAME, PolicyServicer, build_grpc_server

STATE_DIM, ACTION_DIM, CHUNK, NUM_ENVS, SEGMENT_LENGTH = 6, 4, 2, 3, 2
SPEC = EnvSpec({"state": ((STATE_DIM,), "float32")}, ACTION_DIM, "pick up the cube and put it on the plate")


@pytest.fixture
def server(redis_client: redis.Redis) -> Iterator[tuple[str, PolicyServicer, StreamKeys]]:
    torch.manual_seed(0)
    policy = build_policy("gaussian_mlp", SPEC.observation_spec, ACTION_DIM, CHUNK, hidden_sizes=(16,))
    host = PolicyHost(policy, version=5)
    metrics = PolicyServerMetrics()
    batcher = InferenceBatcher(host, max_batch_size=8, max_wait_s=0.002, metrics=metrics).start()
    keys = StreamKeys("grpc-test")
    producer = SegmentProducer(redis_client, keys, max_len=100)
    servicer = PolicyServicer(batcher, SPEC, CHUNK, SEGMENT_LENGTH, producer, metrics, "PutCubeOnPlate-v0")
    grpc_server, port = build_grpc_server(servicer, "127.0.0.1:0", max_workers=8)
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer, keys
    grpc_server.stop(grace=1).wait()
    batcher.stop()


def hello(num_envs: int = NUM_ENVS) -> rollout_pb2.RolloutRequest:
    return rollout_pb2.RolloutRequest(
        hello=rollout_pb2.RolloutHello(
            env_server_id="test-env",
            task="PutCubeOnPlate-v0",
            num_envs=num_envs,
            action_dim=ACTION_DIM,
            action_chunk=CHUNK,
        )
    )


def report(
    step_id: int, state: np.ndarray, rewards: np.ndarray | None = None, truncated=None
) -> rollout_pb2.RolloutRequest:
    msg = rollout_pb2.StepReport(
        step_id=step_id,
        observations=rollout_pb2.ObservationBatch(
            tensors=codec.encode_map({"state": state}), instructions=[SPEC.instruction] * len(state)
        ),
    )
    if rewards is not None:
        n = len(state)
        truncated = np.zeros(n, bool) if truncated is None else truncated
        msg.rewards.CopyFrom(codec.encode(rewards.astype(np.float32)))
        msg.terminated.CopyFrom(codec.encode(np.zeros(n, bool)))
        msg.truncated.CopyFrom(codec.encode(truncated))
        msg.episode_return.CopyFrom(codec.encode(np.full(n, 2.0, np.float32)))
        msg.episode_length.CopyFrom(codec.encode(np.full(n, 7, np.int32)))
        msg.episode_success_once.CopyFrom(codec.encode(np.ones(n, bool)))
        msg.env_steps = n * CHUNK
        if truncated.any():
            msg.final_observations.CopyFrom(
                rollout_pb2.ObservationBatch(tensors=codec.encode_map({"state": state + 1}))
            )
    return rollout_pb2.RolloutRequest(step=msg)


def states() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(NUM_ENVS, STATE_DIM)).astype(np.float32)


def test_rollout_stream_produces_actions_and_segments(server, redis_client: redis.Redis) -> None:
    address, servicer, keys = server
    requests = [hello(), report(0, states())]
    requests += [report(i, states(), rewards=np.full(NUM_ENVS, float(i))) for i in range(1, 4)]
    requests.append(report(4, states(), rewards=np.ones(NUM_ENVS), truncated=np.array([True, False, False])))
    with grpc.insecure_channel(address) as channel:
        responses = list(rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(iter(requests)))
    assert len(responses) == 5
    first = responses[0].actions
    assert first.policy_version == 5 and first.step_id == 1
    assert codec.to_numpy(first.action_chunk).shape == (NUM_ENVS, CHUNK, ACTION_DIM)
    # 4 completed transitions per env -> 2 full segments each (segment_length 2); nothing left to flush
    assert read_counter(redis_client, keys.produced) == 2 * NUM_ENVS
    consumer = SegmentConsumer(redis_client, keys, "g", "c")
    segments = [e.segment for e in consumer.read(100, block_ms=100)]
    assert all(s.length == SEGMENT_LENGTH for s in segments)
    env0_last = [s for s in segments if s.env_key == "test-env/0"][-1]
    assert env0_last.truncated.tolist() == [False, True]
    assert servicer.env_steps == 4 * NUM_ENVS * CHUNK


def test_malformed_observation_is_invalid_argument_and_server_keeps_serving(server) -> None:
    address, _servicer, _keys = server
    bad = report(0, states())
    bad.step.observations.tensors.tensors["state"].data = b"\0" * 5  # byte count does not match the shape
    with grpc.insecure_channel(address) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Rollout(iter([hello(), bad])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "observations/state" in err.value.details() and "bytes" in err.value.details()

        wrong_dim = report(0, np.zeros((NUM_ENVS, STATE_DIM + 1), np.float32))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Rollout(iter([hello(), wrong_dim])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            list(stub.Rollout(iter([report(0, states())])))
        assert "RolloutHello" in err.value.details()

        bad_hello = hello()
        bad_hello.hello.action_dim = ACTION_DIM + 1
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Rollout(iter([bad_hello])))
        assert "action_dim" in err.value.details()

        responses = list(stub.Rollout(iter([hello(), report(0, states())])))  # still serving
        assert len(responses) == 1


def test_act_returns_one_chunk_and_refuses_bad_input(server) -> None:
    address, _servicer, _keys = server
    observation = codec.encode_map({"state": np.zeros(STATE_DIM, np.float32)})
    with grpc.insecure_channel(address) as channel:
        stub = rollout_pb2_grpc.PolicyServiceStub(channel)
        a = stub.Act(rollout_pb2.ActRequest(observation=observation, deterministic=True))
        b = stub.Act(rollout_pb2.ActRequest(observation=observation, deterministic=True))
        assert codec.to_numpy(a.action_chunk).shape == (CHUNK, ACTION_DIM)
        np.testing.assert_array_equal(codec.to_numpy(a.action_chunk), codec.to_numpy(b.action_chunk))
        assert a.policy_version == 5 and np.isfinite(a.value)
        nan_obs = codec.encode_map({"state": np.full(STATE_DIM, np.nan, np.float32)})
        with pytest.raises(grpc.RpcError) as err:
            stub.Act(rollout_pb2.ActRequest(observation=nan_obs))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.value.details()
        bad_dtype = tensor_pb2.TensorMap()
        bad_dtype.tensors["state"].CopyFrom(tensor_pb2.Tensor(dtype=99, shape=[STATE_DIM], data=b""))
        with pytest.raises(grpc.RpcError) as err:
            stub.Act(rollout_pb2.ActRequest(observation=bad_dtype))
        assert "unsupported dtype" in err.value.details()


def test_health_and_reflection(server) -> None:
    address, _servicer, _keys = server
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_weights_swap_between_batches(server) -> None:
    address, servicer, _keys = server
    host = servicer.batcher.host
    zeroed = {k: torch.zeros_like(v) for k, v in host.policy.state_dict().items()}
    host.offer_weights(zeroed, version=9)
    host.offer_weights({k: torch.ones_like(v) for k, v in zeroed.items()}, version=8)  # older: ignored
    observation = codec.encode_map({"state": np.ones(STATE_DIM, np.float32)})
    with grpc.insecure_channel(address) as channel:
        reply = rollout_pb2_grpc.PolicyServiceStub(channel).Act(
            rollout_pb2.ActRequest(observation=observation, deterministic=True)
        )
    assert reply.policy_version == 9
    assert reply.value == 0.0
