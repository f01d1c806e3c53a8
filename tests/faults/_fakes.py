"""In-process pieces for the gRPC fault tests: a real policy server on loopback and a synthetic env batch."""

from __future__ import annotations

import numpy as np
import redis
import torch

from gsrl import codec
from gsrl.config import TLSConfig
from gsrl.env_spec import EnvSpec
from gsrl.metrics import PolicyServerMetrics
from gsrl.policy import build_policy
from gsrl.stream import SegmentProducer, StreamKeys
from gsrl.v1 import rollout_pb2
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import PolicyServicer, build_grpc_server

STATE_DIM, ACTION_DIM, CHUNK = 6, 4, 2
TASK = "PutCubeOnPlate-v0"
SPEC = EnvSpec({"state": ((STATE_DIM,), "float32")}, ACTION_DIM, "pick up the cube and put it on the plate")


class PolicyServerUnderTest:
    """The real PolicyServicer behind a real gRPC server on 127.0.0.1 (plaintext or TLS)."""

    def __init__(
        self,
        client: redis.Redis | None,
        prefix: str = "faults",
        tls: TLSConfig | None = None,
        max_message_bytes: int = 64 << 20,
        max_workers: int = 16,
        segment_length: int = 4,
    ) -> None:
        torch.manual_seed(0)
        policy = build_policy("gaussian_mlp", SPEC.observation_spec, ACTION_DIM, CHUNK, hidden_sizes=(16,))
        self.metrics = PolicyServerMetrics()
        self.batcher = InferenceBatcher(PolicyHost(policy, version=1), 64, 0.002, self.metrics).start()
        self.keys = StreamKeys(prefix)
        producer = SegmentProducer(client, self.keys, max_len=100000) if client is not None else None
        self.servicer = PolicyServicer(self.batcher, SPEC, CHUNK, segment_length, producer, self.metrics, TASK)
        self.server, self.port = build_grpc_server(
            self.servicer, "127.0.0.1:0", max_workers=max_workers, tls=tls, max_message_bytes=max_message_bytes
        )
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        # Bounded: a handler stuck on a stream whose request failed to deserialize can keep grpc's shutdown
        # event from being set (seen under heavy load); the RPCs themselves are cancelled after the grace.
        self.server.stop(grace=0.5).wait(timeout=10)
        self.batcher.stop()


def hello(num_envs: int, task: str = TASK, env_id: str = "fake-env") -> rollout_pb2.RolloutRequest:
    return rollout_pb2.RolloutRequest(
        hello=rollout_pb2.RolloutHello(
            env_server_id=env_id, task=task, num_envs=num_envs, action_dim=ACTION_DIM, action_chunk=CHUNK
        )
    )


def report(step_id: int, state: np.ndarray, with_rewards: bool = True) -> rollout_pb2.RolloutRequest:
    n = len(state)
    msg = rollout_pb2.StepReport(
        step_id=step_id,
        observations=rollout_pb2.ObservationBatch(tensors=codec.encode_map({"state": state})),
    )
    if with_rewards:
        msg.rewards.CopyFrom(codec.encode(np.ones(n, np.float32)))
        msg.terminated.CopyFrom(codec.encode(np.zeros(n, bool)))
        msg.truncated.CopyFrom(codec.encode(np.zeros(n, bool)))
        msg.env_steps = n * CHUNK
    return rollout_pb2.RolloutRequest(step=msg)


def states(num_envs: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_envs, STATE_DIM)).astype(np.float32)


class FakeEnvBatch:
    """Stands in for EnvBatch in EnvServer: synthetic observations, records every action chunk it steps."""

    def __init__(self, num_envs: int = 2) -> None:
        self.num_envs = num_envs
        self.action_dim = ACTION_DIM
        self.instructions = [SPEC.instruction] * num_envs
        self.stepped: list[np.ndarray] = []

    def reset(self) -> dict[str, np.ndarray]:
        return {"state": states(self.num_envs)}

    def step_chunk(self, action_chunk: np.ndarray):
        from services.env_server.core import ChunkResult

        assert np.isfinite(action_chunk).all() and action_chunk.shape == (self.num_envs, CHUNK, ACTION_DIM)
        self.stepped.append(action_chunk)
        n = self.num_envs
        zeros = np.zeros(n, bool)
        return ChunkResult(
            observations={"state": states(n, len(self.stepped))},
            final_observations={"state": states(n)},
            rewards=np.ones(n, np.float32),
            step_rewards=np.ones((n, CHUNK), np.float32),
            terminated=zeros,
            truncated=zeros,
            episode_return=np.zeros(n, np.float32),
            episode_length=np.zeros(n, np.int32),
            episode_success_once=zeros,
            episode_success_at_end=zeros,
            steps_executed=n * CHUNK,
        )

    def close(self) -> None:
        pass
