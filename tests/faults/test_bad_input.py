"""Bad input of every kind is answered with a clear error, and the server keeps serving."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from _fakes import ACTION_DIM, CHUNK, TASK, FakeEnvBatch, PolicyServerUnderTest, hello, report, states

from gsrl import codec
from gsrl.stream import SEGMENT_FIELD, SegmentConsumer, SegmentProducer, StreamKeys, read_counter
from gsrl.v1 import rollout_pb2, rollout_pb2_grpc
from services.env_server.server import EnvServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy_server(redis_client: redis.Redis):
    server = PolicyServerUnderTest(redis_client, max_message_bytes=64 << 10)
    yield server
    server.stop()


def rollout_error(address: str, requests: list) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        list(rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(iter(requests)))
    return err.value


def still_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        responses = list(rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(iter([hello(2), report(0, states(2))])))
    assert len(responses) == 1 and codec.to_numpy(responses[0].actions.action_chunk).shape == (2, CHUNK, ACTION_DIM)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda t: t.CopyFrom(codec.encode(states(2).astype(np.float64))), "dtype"),
        (lambda t: t.shape.append(1), "shape"),
        (lambda t: setattr(t, "data", t.data[:-3]), "bytes"),
        (lambda t: setattr(t, "dtype", 999), "unsupported dtype"),
        (lambda t: setattr(t, "data", np.full(12, np.nan, np.float32).tobytes()), "NaN"),
        (lambda t: setattr(t, "data", np.full(12, np.inf, np.float32).tobytes()), "NaN or infinite"),
    ],
    ids=["dtype", "shape", "byte-length", "unknown-dtype", "nan", "inf"],
)
def test_malformed_observation_tensor(policy_server, corrupt, expected) -> None:
    bad = report(0, states(2))
    corrupt(bad.step.observations.tensors.tensors["state"])
    error = rollout_error(policy_server.address, [hello(2), bad])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert expected.lower() in error.details().lower(), error.details()
    still_serving(policy_server.address)


def test_unknown_task_and_oversized_message_and_garbage_bytes(policy_server) -> None:
    error = rollout_error(policy_server.address, [hello(2, task="NoSuchTask-v9")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "NoSuchTask-v9" in error.details()

    huge = np.zeros((2, 6), np.float32)
    too_big = report(0, huge)
    too_big.step.observations.instructions.extend(["x" * (80 << 10)] * 2)  # > max_message_bytes (64 KiB)
    error = rollout_error(policy_server.address, [hello(2), too_big])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error

    with grpc.insecure_channel(policy_server.address) as channel:
        raw = channel.stream_stream(
            "/gsrl.v1.PolicyService/Rollout", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xfe\x00garbage\x12\x99", b"\x0a\xff\xff\xff\xff\x0f"])))
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), err.value
        print("garbage bytes ->", err.value.code(), err.value.details())
    still_serving(policy_server.address)


class _BadActionsServicer(rollout_pb2_grpc.PolicyServiceServicer):
    """Answers the first streams with malformed ActionBatches, later ones correctly."""

    def __init__(self, bad: list) -> None:
        self.bad = bad
        self.streams = 0

    def Rollout(self, request_iterator, context):  # noqa: N802
        self.streams += 1
        kind = self.bad[self.streams - 1] if self.streams <= len(self.bad) else None
        for request in request_iterator:
            if request.HasField("hello"):
                continue
            n = len(codec.to_numpy(request.step.observations.tensors.tensors["state"]))
            actions = np.zeros((n, CHUNK, ACTION_DIM), np.float32)
            if kind == "nan":
                actions[0, 0, 0] = np.nan
            elif kind == "inf":
                actions[-1, -1, -1] = np.inf
            elif kind == "shape":
                actions = np.zeros((n, CHUNK, ACTION_DIM + 1), np.float32)
            elif kind == "dtype":
                actions = actions.astype(np.float64)
            message = codec.encode(actions)
            if kind == "bytes":
                message.data = message.data[:-1]
            yield rollout_pb2.RolloutResponse(
                actions=rollout_pb2.ActionBatch(step_id=request.step.step_id + 1, action_chunk=message)
            )


def test_env_server_refuses_malformed_action_batches(caplog) -> None:
    from concurrent import futures

    servicer = _BadActionsServicer(["nan", "inf", "shape", "dtype", "bytes"])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rollout_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    batch = FakeEnvBatch()
    env = EnvServer(batch, f"127.0.0.1:{port}", "env-bad", TASK, CHUNK, backoff_s=0.05, max_backoff_s=0.1)
    thread = threading.Thread(target=env.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(batch.stepped) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(batch.stepped) >= 5, "env server stopped serving after malformed actions"
    finally:
        env.stop()
        thread.join(10)
        server.stop(0)
    assert servicer.streams >= 6  # one stream per malformed batch, then the good one
    assert all(np.isfinite(a).all() for a in batch.stepped)  # never stepped with NaN (FakeEnvBatch asserts too)
    errors = [r.getMessage() for r in caplog.records if "malformed ActionBatch" in r.getMessage()]
    assert len(errors) == 5 and any("NaN" in e for e in errors) and any("shape" in e for e in errors), errors


def test_undecodable_segment_goes_to_dead_letters(redis_client: redis.Redis) -> None:
    keys = StreamKeys("faults-dead")
    producer = SegmentProducer(redis_client, keys, max_len=100)
    from gsrl.trajectory import Segment  # noqa: F401 - the stream's own producer writes the good ones

    redis_client.xadd(keys.stream, {SEGMENT_FIELD: b"\x08\xff not a segment"})
    redis_client.xadd(keys.stream, {b"other": b"no segment field"})
    consumer = SegmentConsumer(redis_client, keys, "learners", "rank-0")
    assert consumer.read(10, block_ms=100) == []
    assert consumer.read(10, block_ms=100) == []  # not retried
    assert redis_client.xlen(keys.dead_letters) == 2 and redis_client.xlen(keys.stream) == 0
    assert read_counter(redis_client, keys.dropped) == 2
    assert producer.stream_length() == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gsrl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_invalid_yaml_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("run:\n  name: [unclosed\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("algo:\n  clip_ration: 0.2\n")
    for role in ("learner", "policy-server", "env-server"):
        result = _cli(role, "-c", str(broken))
        assert result.returncode == 2, result
        assert "not valid YAML" in result.stderr and str(broken) in result.stderr, result.stderr
    result = _cli("policy-server", "-c", str(typo))
    assert result.returncode == 2 and "algo.clip_ration" in result.stderr and "clip_ratio" in result.stderr
    result = _cli("learner", "-c", str(typo), "env_server.policy_address=nohostport")
    assert result.returncode == 2
