"""The weight broadcast over NCCL between two GPUs: learner rank 0's publisher on cuda:0, a policy server on cuda:1.

Skipped with the reason where fewer than two CUDA devices are visible (CI, this project's 1-GPU machines): NCCL
refuses two ranks on one device, so the NCCL group needs a GPU per rank. On a 2-GPU host: ``pytest tests/gpu``.
The subscriber is a real process (``tests/integration/_weights_subscriber.py``) that checks every element of every
version it receives against the version's expected tensors and reports the devices they arrived on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import torch

from gsrl.weight_layout import plan_buckets, tensor_layout
from gsrl.weights import WeightPublisher

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from _weights_subscriber import events_key, make_state, stop_key  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs for an NCCL group of two ranks; this machine shows {torch.cuda.device_count()}",
)

HELPER = Path(__file__).parents[1] / "integration" / "_weights_subscriber.py"
REPO = Path(__file__).resolve().parents[2]
BUCKET_BYTES = 4096  # several buckets of mixed dtypes (see make_state)
EVENT_TIMEOUT_S = 120  # the subscriber imports torch and initializes CUDA first


def _events_until(client: redis.Redis, prefix: str, sub_id: str, event: str, **match: object) -> list[dict]:
    seen: list[dict] = []
    while True:
        item = client.blpop([events_key(prefix, sub_id)], timeout=EVENT_TIMEOUT_S)
        assert item is not None, f"subscriber sent no event within {EVENT_TIMEOUT_S}s; seen {seen}"
        seen.append(json.loads(item[1]))
        if seen[-1]["event"] == event and all(seen[-1].get(k) == v for k, v in match.items()):
            return seen


def test_nccl_publisher_on_gpu0_delivers_every_version_to_a_subscriber_on_gpu1(redis_server, redis_client) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    assert len(plan_buckets(tensor_layout(make_state(1)), BUCKET_BYTES)) >= 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(HELPER), str(redis_server.port), prefix, "gpu1", "--timeout-s", "60"]
    subscriber = subprocess.Popen([*args, "--device", "cuda:1"], env=env)
    publisher = WeightPublisher(
        redis_client,
        key_prefix=prefix,
        bind_host="127.0.0.1",
        advertise_host="127.0.0.1",
        backend="nccl",
        device="cuda:0",
        bucket_bytes=BUCKET_BYTES,
        timeout_s=60.0,
        subscriber_ttl_s=30.0,
    )
    try:
        assert _events_until(redis_client, prefix, "gpu1", "started")[-1]["snapshot_version"] is None
        stats = []
        for version in (1, 2, 3):
            state = {k: v.to("cuda:0") for k, v in make_state(version).items()}
            stats.append(publisher.publish(state, version))
        assert [(s.num_subscribers, s.error) for s in stats] == [(1, None)] * 3, stats
        assert stats[0].rebuilt and not stats[1].rebuilt
        events = _events_until(redis_client, prefix, "gpu1", "weights", version=3)
        delivered = [e for e in events if e["event"] == "weights"]
        assert [e["version"] for e in delivered] == [1, 2, 3]
        assert all(e["ok"] for e in delivered), delivered  # every element of every tensor as published
        assert all(e["devices"] == ["cuda:1"] for e in delivered), delivered
        group = json.loads(redis_client.get(f"{prefix}:weights:group"))
        assert group["backend"] == "nccl"
    finally:
        redis_client.set(stop_key(prefix, "gpu1"), 1)
        try:
            subscriber.wait(60)
        except subprocess.TimeoutExpired:
            subscriber.kill()
        publisher.close()
