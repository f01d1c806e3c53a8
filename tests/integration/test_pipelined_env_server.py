"""Pipelined env stages (``env_server.pipeline_stages``): a K=2 env server against a real policy server and Redis.

Splitting an env server into stages must not change what reaches the learner: every env's transitions arrive in
segments exactly once, in order and without gaps, the step count matches what the envs executed, and every
segment is accounted for (produced == consumed + still in the stream). The pipelining gain itself is a timing
figure and lives in ``make bench`` (stage ``bench/pipeline.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from gsrl.config import ConfigError, TaskConfig, load_config
from gsrl.env_spec import EnvSpec, wire_dtype_name
from gsrl.metrics import EnvServerMetrics, PolicyServerMetrics
from gsrl.policy import build_policy
from gsrl.stream import SegmentConsumer, SegmentProducer, StreamKeys, read_counter
from gsrl.trajectory import Segment
from services.env_server.core import ChunkResult, EnvBatch
from services.env_server.server import EnvServer
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import PolicyServicer, build_grpc_server

ROOT = Path(__file__).resolve().parents[2]
TASK = TaskConfig(control_mode="pd_ee_delta_pose", max_episode_steps=5)  # short episodes: resets mid-run
CHUNK = 2  # with 5-step episodes some end inside a chunk: executed steps < envs x chunk there
STAGES, ENVS_PER_STAGE, SEGMENT_LENGTH = 2, 2, 4


class RecordingBatch:
    """An ``EnvBatch`` that remembers what each of its envs reported, to compare with the segments."""

    def __init__(self, batch: EnvBatch) -> None:
        self.batch = batch
        self.num_envs, self.action_dim, self.instructions = batch.num_envs, batch.action_dim, batch.instructions
        self.observations: list[np.ndarray] = []  # [num_envs, D] per report, the reset's first
        self.results: list[ChunkResult] = []

    def reset(self) -> dict[str, np.ndarray]:
        observations = self.batch.reset()
        self.observations.append(observations["state"].copy())
        return observations

    def step_chunk(self, action_chunk: np.ndarray) -> ChunkResult:
        result = self.batch.step_chunk(action_chunk)
        self.observations.append(result.observations["state"].copy())
        self.results.append(result)
        return result


class StubRecorder:
    """Stands in for ``EpisodeRecorder``: which results it was given (it films env 0 of the first stage)."""

    def __init__(self) -> None:
        self.started: dict[str, np.ndarray] | None = None
        self.recorded: list[ChunkResult] = []

    def start(self, observations: dict[str, np.ndarray]) -> None:
        self.started = observations

    def record(self, result: ChunkResult) -> None:
        self.recorded.append(result)


class PolicyServer:
    """A real policy server (batcher, servicer, gRPC on loopback) writing segments to a real Redis."""

    def __init__(self, client: redis.Redis, spec: EnvSpec, prefix: str, chunk: int) -> None:
        torch.manual_seed(0)
        policy = build_policy("gaussian_mlp", spec.observation_spec, spec.action_dim, chunk, hidden_sizes=(16,))
        self.metrics = PolicyServerMetrics()
        self.batcher = InferenceBatcher(PolicyHost(policy, version=1), 64, 0.002, self.metrics).start()
        self.keys = StreamKeys(prefix)
        producer = SegmentProducer(client, self.keys, max_len=100000)
        self.servicer = PolicyServicer(self.batcher, spec, chunk, SEGMENT_LENGTH, producer, self.metrics, TASK.id)
        self.server, port = build_grpc_server(self.servicer, "127.0.0.1:0", max_workers=8)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def streams(self) -> float:
        return self.metrics.streams._value.get()

    def stop(self) -> None:
        self.server.stop(grace=0.5).wait(timeout=10)
        self.batcher.stop()


def spec_of(batch: EnvBatch) -> EnvSpec:
    observation_spec = {key: (shape, wire_dtype_name(dtype)) for key, (shape, dtype) in batch.observation_spec.items()}
    return EnvSpec(observation_spec, batch.action_dim, batch.instructions[0])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.05)


def read_all(consumer: SegmentConsumer) -> list:
    entries, batch = [], consumer.read(1000, block_ms=100)
    while batch:
        entries += batch
        batch = consumer.read(1000, block_ms=100)
    return entries


@pytest.fixture
def stages() -> Iterator[list[RecordingBatch]]:
    batches = [
        RecordingBatch(EnvBatch.for_task(TASK, ENVS_PER_STAGE, seed=7, first_env=k * ENVS_PER_STAGE))
        for k in range(STAGES)
    ]
    yield batches
    for b in batches:
        b.batch.close()


def test_two_stages_account_for_every_step(stages: list[RecordingBatch], redis_client: redis.Redis) -> None:
    policy = PolicyServer(redis_client, spec_of(stages[0].batch), "pipelined", CHUNK)
    recorder = StubRecorder()
    env = EnvServer(
        stages, policy.address, "env-p", TASK.id, CHUNK, EnvServerMetrics(), backoff_s=0.2, recorder=recorder
    )
    consumer = SegmentConsumer(redis_client, policy.keys, "learners", "rank-0")
    consumed: list[Segment] = []
    thread = threading.Thread(target=env.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: policy.streams() == STAGES, "one stream per stage", 20)
        wait_for(lambda: min(len(s.results) for s in stages) >= 12, "12 chunks in every stage", 30)
        entries = consumer.read(1000, block_ms=100)  # a learner takes some while the env server runs
        consumer.acknowledge([e.entry_id for e in entries])
        consumed = [e.segment for e in entries]
        wait_for(lambda: min(len(s.results) for s in stages) >= 20, "20 chunks in every stage", 30)
    finally:
        env.stop()
        thread.join(10)
    assert not thread.is_alive(), "the env server did not stop"
    wait_for(lambda: policy.streams() == 0, "the policy server to flush both streams", 10)
    policy.stop()

    in_stream = [e.segment for e in read_all(consumer)]
    produced = read_counter(redis_client, policy.keys.produced)
    assert consumed and produced == read_counter(redis_client, policy.keys.consumed) + redis_client.xlen(
        policy.keys.stream
    )
    assert produced == len(consumed) + len(in_stream)

    by_env: dict[str, list[Segment]] = {}
    for segment in consumed + in_stream:  # stream order is each stream's order
        by_env.setdefault(segment.env_key, []).append(segment)
    keys = {f"env-p-s{k}/{i}" for k in range(STAGES) for i in range(ENVS_PER_STAGE)}
    assert set(by_env) == keys, sorted(by_env)

    expected_env_steps = 0
    for k, stage in enumerate(stages):
        stepped = len(stage.results)
        delivered = {len(np.concatenate([s.rewards.numpy() for s in by_env[f"env-p-s{k}/{i}"]])) for i in range(2)}
        assert len(delivered) == 1, f"stage {k}: its envs have different transition counts {delivered}"
        (transitions,) = delivered
        # the last chunk's report may not have left before the stream was cancelled; nothing else may be missing
        assert stepped - 1 <= transitions <= stepped, (k, stepped, transitions)
        expected_env_steps += sum(r.steps_executed for r in stage.results[:transitions])
        for i in range(ENVS_PER_STAGE):
            segments = by_env[f"env-p-s{k}/{i}"]
            assert all(s.length <= SEGMENT_LENGTH for s in segments)
            # consecutive and gap-free: the segments' observations are exactly what this env reported, in order
            observations = np.concatenate([s.observations["state"].numpy() for s in segments])
            reported = np.stack([o[i] for o in stage.observations[:transitions]])
            np.testing.assert_array_equal(observations, reported, err_msg=f"stage {k} env {i}")
            rewards = np.concatenate([s.rewards.numpy() for s in segments])
            np.testing.assert_allclose(rewards, [r.rewards[i] for r in stage.results[:transitions]], rtol=1e-6)
            ended = [r for r in stage.results[:transitions] if r.ended[i]]
            episodes = [ep for s in segments for ep in s.episodes]
            assert len(ended) >= 3 and len(episodes) == len(ended), (k, i, len(ended), len(episodes))
            assert [ep.episode_length for ep in episodes] == [int(r.episode_length[i]) for r in ended]
            # only the stop flushes a partial segment, and it ends its trajectory: GAE never bootstraps across it
            partial = [s for s in segments if s.length < SEGMENT_LENGTH]
            assert partial in ([], [segments[-1]]), [s.length for s in segments]
            assert all(bool(s.terminated[-1] or s.truncated[-1]) for s in partial)
    assert policy.servicer.env_steps == expected_env_steps
    assert env.total_steps == sum(r.steps_executed for s in stages for r in s.results)
    assert env.episodes == sum(int(r.ended.sum()) for s in stages for r in s.results)
    # the recorder films env 0 of stage 0 only
    assert recorder.started is not None and recorder.started["state"].shape[0] == ENVS_PER_STAGE
    assert len(recorder.recorded) == len(stages[0].results)
    assert all(a is b for a, b in zip(recorder.recorded, stages[0].results, strict=True))


def test_two_stages_move_to_another_policy_server_without_duplicates(
    stages: list[RecordingBatch], redis_client: redis.Redis
) -> None:
    """The policy server dies: both stages reconnect to the other one; no transition is assembled twice."""
    spec = spec_of(stages[0].batch)
    first, second = PolicyServer(redis_client, spec, "moved", CHUNK), PolicyServer(redis_client, spec, "moved", CHUNK)
    address = f"{first.address},{second.address}"
    env = EnvServer(stages, address, "env-m", TASK.id, CHUNK, EnvServerMetrics(), backoff_s=0.2, max_backoff_s=1.0)
    thread = threading.Thread(target=env.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: first.streams() == STAGES, "both stages on the first policy server", 20)
        wait_for(lambda: min(len(s.results) for s in stages) >= 10, "10 chunks in every stage", 30)
        first.stop()  # the pod is killed: both stages' streams break and reopen on the other one
        wait_for(lambda: second.streams() == STAGES, "both stages on the second policy server", 20)
        moved_at = [len(s.results) for s in stages]
        wait_for(lambda: all(len(s.results) >= m + 10 for s, m in zip(stages, moved_at, strict=True)), "10 more", 30)
    finally:
        env.stop()
        thread.join(10)
    wait_for(lambda: second.streams() == 0, "the policy server to flush both streams", 10)
    second.stop()
    consumer = SegmentConsumer(redis_client, first.keys, "learners", "rank-0")
    segments = [e.segment for e in read_all(consumer)]
    assert read_counter(redis_client, first.keys.produced) == len(segments) == redis_client.xlen(first.keys.stream)
    assert first.servicer.env_steps > 0 and second.servicer.env_steps > 0
    delivered_steps = 0
    for k, stage in enumerate(stages):
        for i in range(ENVS_PER_STAGE):
            # where each reported observation of this env sits in what it reported (states never repeat exactly)
            position = {o[i].tobytes(): j for j, o in enumerate(stage.observations)}
            runs = sorted(
                [position[row.tobytes()] for row in s.observations["state"].numpy()]
                for s in segments
                if s.env_key == f"env-m-s{k}/{i}"
            )
            assert all(run == list(range(run[0], run[0] + len(run))) for run in runs), f"stage {k} env {i}"
            steps = [j for run in runs for j in run]
            assert steps[0] == 0 and len(set(steps)) == len(steps), f"stage {k} env {i}: a step assembled twice"
            # the one report that was in flight to the dead server may be lost; nothing else
            missing = sorted(set(range(steps[-1] + 1)) - set(steps))
            assert len(missing) <= 1 and steps[-1] >= len(stage.results) - 2, (k, i, missing, steps[-1])
            if i == 0:
                delivered_steps += sum(stage.results[j].steps_executed for j in steps)
    assert first.servicer.env_steps + second.servicer.env_steps == delivered_steps


def test_stages_seed_each_env_as_the_unsplit_batch_does() -> None:
    with EnvBatch.for_task(TASK, 4, seed=11) as whole, EnvBatch.for_task(TASK, 2, seed=11, first_env=2) as second:
        np.testing.assert_array_equal(whole.reset()["state"][2:], second.reset()["state"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env_server.num_envs=3", "env_server.pipeline_stages=2"], "must divide env_server.num_envs (3)"),
        (["env_server.pipeline_stages=0"], "must be >= 1"),
    ],
)
def test_pipeline_stages_must_divide_num_envs(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/state_ppo.yaml", overrides)
    assert err.value.key == "env_server.pipeline_stages" and message in str(err.value)
    load_config(ROOT / "configs/state_ppo.yaml", ["env_server.num_envs=4", "env_server.pipeline_stages=2"])


@pytest.mark.timeout(60)
def test_env_server_process_runs_two_stages_and_stops_on_sigterm(redis_client: redis.Redis) -> None:
    """`gsrl env-server` with env_server.pipeline_stages=2: two streams, every step in a segment, SIGTERM exits 0."""
    config = load_config(ROOT / "configs/state_ppo.yaml", ["task.max_episode_steps=10"])
    with EnvBatch.for_task(config.task, 1, seed=0) as probe:
        spec = spec_of(probe)
    policy = PolicyServer(redis_client, spec, "pipelined-proc", config.policy.action_chunk)
    overrides = [
        "task.max_episode_steps=10",
        "env_server.num_envs=2",
        "env_server.pipeline_stages=2",
        f"env_server.policy_address={policy.address}",
        "env_server.metrics_port=0",
    ]
    command = [sys.executable, "-m", "services.env_server", "-c", "state_ppo", "--id", "env-q", *overrides]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: policy.streams() == 2 or process.poll() is not None, "two streams", 40)
        assert process.poll() is None, process.communicate()[0][-3000:]
        wait_for(lambda: policy.servicer.env_steps >= 60, "60 env steps", 30)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        output = process.communicate(timeout=15)[0]
        print(f"exited {time.monotonic() - stopped:.2f}s after SIGTERM")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-3000:]
    assert "2 envs in 2 pipelined stages of 1" in output
    wait_for(lambda: policy.streams() == 0, "the policy server to flush both streams", 10)
    policy.stop()
    segments = [e.segment for e in read_all(SegmentConsumer(redis_client, policy.keys, "learners", "rank-0"))]
    assert read_counter(redis_client, policy.keys.produced) == len(segments) == redis_client.xlen(policy.keys.stream)
    assert {s.env_key for s in segments} == {"env-q-s0/0", "env-q-s1/0"}
    # one-step chunks that never end early: every env step reported is one transition in a segment
    assert sum(s.length for s in segments) == policy.servicer.env_steps
