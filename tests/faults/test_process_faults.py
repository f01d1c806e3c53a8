"""Kill -9 an env server, kill -9 and restart the learner, crash and restart Redis: the run goes on, nothing is lost.

Every role is its own process against a real redis-server on loopback. At the end every segment a
policy server stored is accounted for: produced == consumed (trained on) + dropped + still in the stream.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from _harness import Rig, durable_redis

from gsrl.redis_server import LocalRedis
from gsrl.stream import SEGMENT_FIELD, segment_from_proto
from gsrl.v1 import trajectory_pb2

pytestmark = pytest.mark.e2e


def assert_accounted(rig: Rig) -> dict[str, int]:
    counts = rig.counts()
    print("counts:", counts)
    assert counts["produced"] > 0
    assert counts["produced"] == counts["consumed"] + counts["dropped"] + counts["in_stream"], counts
    return counts


def streamed_env_keys(rig: Rig) -> set[str]:
    """The env keys (``env-<server>/<env>``) of every segment in the stream."""
    return {
        segment_from_proto(trajectory_pb2.TrajectorySegment.FromString(fields[SEGMENT_FIELD])).env_key
        for _entry_id, fields in rig.client.xrange(rig.keys.stream)
    }


@pytest.mark.timeout(150)
def test_kill_env_server_others_keep_stepping(tmp_path: Path) -> None:
    # No learner: every segment stays in the stream, so the killed env server's segments can be inspected.
    with LocalRedis(tmp_path / "redis") as local_redis:
        rig = Rig(tmp_path, local_redis, ("redis.max_stream_len=100000",))
        try:
            rig.spawn("policy_server", "policy")
            victim, survivor = rig.env_server(0), rig.env_server(1)
            # Both envs of the victim must have streamed a segment before the kill (on a loaded runner a total step
            # count was reached by the survivor alone, and the victim died with nothing in the stream).
            wanted = {"env-0/0", "env-0/1", "env-1/0"}
            rig.wait_for(lambda: wanted <= streamed_env_keys(rig), "segments from both env servers", 90)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            rig.children.remove(victim)
            samples, longest_stall = [], 0.0
            last_change, last_value = time.monotonic(), rig.env_steps()
            end = time.monotonic() + 10
            while time.monotonic() < end:
                time.sleep(0.25)
                value = rig.env_steps()
                now = time.monotonic()
                if value > last_value:
                    last_change, last_value = now, value
                longest_stall = max(longest_stall, now - last_change)
                samples.append(value)
                assert survivor.process.poll() is None, survivor.tail(40)
            print(f"env steps after the kill: {samples[0]} -> {samples[-1]}, longest stall {longest_stall:.1f}s")
            assert samples[-1] > samples[0]
            assert longest_stall < 5.0
        finally:
            rig.stop_all()
        counts = assert_accounted(rig)
        entries = rig.client.xrange(rig.keys.stream)
        assert len(entries) == counts["produced"]
        victims = {}
        for _entry_id, fields in entries:
            segment = segment_from_proto(trajectory_pb2.TrajectorySegment.FromString(fields[SEGMENT_FIELD]))
            assert segment.length <= rig.config.policy_server.segment_length
            if segment.env_key.startswith("env-0/"):
                victims.setdefault(segment.env_key, []).append(segment)
        assert set(victims) == {"env-0/0", "env-0/1"}, sorted(victims)
        for env_key, segments in victims.items():
            last = max(segments, key=lambda s: s.created_unix)
            partial = last.length < rig.config.policy_server.segment_length
            # a flushed partial segment ends its trajectory (terminated or truncated); no half transition in it
            assert not partial or bool(last.terminated[-1] or last.truncated[-1]), env_key
            assert len(last.rewards) == last.length and bool(last.rewards.isfinite().all())
        rig.close()


@pytest.mark.timeout(170)
def test_kill_learner_and_restart_resumes(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as local_redis:
        rig = Rig(tmp_path, local_redis, ("learner.checkpoint_every=2",))
        try:
            learner = rig.spawn("learner", "learner")
            rig.spawn("policy_server", "policy")
            rig.env_server(0)
            rig.wait_for(lambda: rig.updates() >= 5, "five learner updates", 120)
            # a segment that does not decode, from a misbehaving producer (counted as produced, as producers do)
            rig.client.xadd(rig.keys.stream, {SEGMENT_FIELD: b"\x08\xff garbage"})
            rig.client.incr(rig.keys.produced)
            learner.process.send_signal(signal.SIGKILL)
            learner.process.wait(10)
            rig.children.remove(learner)
            version_at_kill = rig.policy_version()
            pending = rig.client.xpending(rig.keys.stream, rig.config.redis.group)["pending"]
            restarted = rig.spawn("learner", "learner-restarted")
            rig.wait_for(lambda: rig.policy_version() >= version_at_kill + 3, "updates after the restart", 120)
        finally:
            rig.stop_all()
        log = restarted.log_path.read_text()
        print(f"killed at v{version_at_kill} with {pending} entries pending; now v{rig.policy_version()}")
        assert "resumed from" in log
        assert rig.policy_version() > version_at_kill
        assert int(rig.client.xlen(rig.keys.dead_letters)) == 1
        assert_accounted(rig)
        assert restarted.process.returncode == 0, restarted.tail(40)
        rig.close()


@pytest.mark.timeout(170)
def test_redis_crash_and_restart(tmp_path: Path) -> None:
    local_redis = durable_redis(tmp_path).start()
    # weights.py: after Redis comes back, the next broadcast waits broadcast_timeout_s on the subscriber that
    # left its group while Redis was down, then rebuilds; a short timeout keeps the test short.
    rig = Rig(tmp_path, local_redis, ("learner.broadcast_timeout_s=10",))
    try:
        rig.spawn("learner", "learner")
        policy = rig.spawn("policy_server", "policy")
        rig.env_server(0)
        rig.wait_for(lambda: rig.updates() >= 3, "three learner updates", 120)
        before, updates_before = rig.counts(), rig.updates()
        local_redis.process.send_signal(signal.SIGKILL)  # a crash: only fsynced writes survive
        local_redis.process.wait(10)
        time.sleep(3)
        for child in rig.children:
            assert child.process.poll() is None, f"{child.name} died while Redis was down:\n{child.tail(40)}"
        local_redis.start()
        after_restart = rig.counts()
        assert after_restart["produced"] >= before["produced"]  # acknowledged XADDs survived the crash
        rig.wait_for(lambda: rig.updates() >= updates_before + 6, "updates after the restart", 120)
        rig.wait_for(lambda: rig.counts()["produced"] > after_restart["produced"] + 4, "new segments", 60)
    finally:
        rig.stop_all()
    tails = rig.tails(60)
    print(tails[-4000:])
    try:
        assert_accounted(rig)
        assert policy.process.returncode == 0, policy.tail(60)
        assert all(c.process.returncode == 0 for c in rig.children), tails
    finally:
        rig.close()
        local_redis.stop()
