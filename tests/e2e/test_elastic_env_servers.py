"""Elastic env servers: scale from 1 to 3 mid-run, SIGTERM two of them, and nothing is lost.

Each role is its own process, started the way pods are (one command per role, one shared config),
against a real redis-server. Scaling never restarts the learner or the policy server. The same run
checks that every metric the Grafana dashboard queries is exported by one of the running roles.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis
from _tiny_run import TINY_RUN

from gsrl.config import dump_config, load_config
from gsrl.launcher import Child, effective_config, spawn
from gsrl.redis_server import LocalRedis, free_port_block
from gsrl.stream import StreamKeys, read_counter

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/helm/gsrl/dashboards/gsrl.json"
OVERRIDES = [
    *TINY_RUN,
    "algo.max_policy_lag=3",
    "run.duration_s=0",
]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, children: list[Child]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        for child in children:
            assert child.process.poll() is None, f"{child.name} exited early:\n{child.tail(40)}"
        time.sleep(0.25)
    logs = "\n".join(f"--- {c.name}\n{c.tail(20)}" for c in children)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs}")


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def declared_series(text: str) -> set[str]:
    """Family and series names a /metrics page declares in its # TYPE lines (declared even before a labelled
    family has samples), with the suffixes each type exposes."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        base = family.removesuffix("_total") if kind == "counter" else family
        names |= {base, family} | {base + suffix for suffix in suffixes.get(kind, ())}
    return names


def scrape(port: int, metric: str) -> float:
    text = metrics_text(port)
    for line in text.splitlines():
        if line.startswith(metric + " "):
            return float(line.split()[1])
    raise AssertionError(f"{metric} not exported")


def test_scale_up_and_down_mid_run(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as local_redis:
        # One block: env server i serves metrics on env_port + i, so separately drawn ports could collide.
        base = free_port_block(6)
        metrics_port, learner_port, env_port = base, base + 1, base + 2
        ports = [
            f"policy_server.metrics_port={metrics_port}",
            f"learner.metrics_port={learner_port}",
            f"env_server.metrics_port={env_port}",
        ]
        config = effective_config(load_config("configs/state_ppo.yaml", [*OVERRIDES, *ports]), local_redis.port)
        config_path = tmp_path / "run.yaml"
        dump_config(config, config_path)
        client = redis.Redis(port=local_redis.port)
        keys = StreamKeys(config.redis.key_prefix, config.redis.stream)
        env = {
            **os.environ,
            "GSRL_REDIS_URL": local_redis.url,
            "GSRL_RUN_DIR": str(tmp_path / "run"),
            "OMP_NUM_THREADS": "1",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(config.learner.master_port),
        }
        logs = tmp_path / "logs"
        logs.mkdir()
        common = ["--config", str(config_path)]

        def updates() -> int:
            return int(client.hget(f"{config.redis.key_prefix}:stats:learner", "updates") or 0)

        def streams() -> float:
            return scrape(metrics_port, "gsrl_policy_connected_streams")

        learner = spawn("learner", "learner", common, env, logs)
        policy = spawn("policy_server", "policy", common, env, logs)
        envs = [spawn("env_server", "env-0", [*common, "--index", "0", "--id", "env-0"], env, logs)]
        children = [learner, policy, *envs]
        try:
            wait_for(lambda: updates() >= 2, "two updates with one env server", 240, children)
            for i in (1, 2):  # kubectl scale --replicas=3
                envs.append(
                    spawn("env_server", f"env-{i}", [*common, "--index", str(i), "--id", f"env-{i}"], env, logs)
                )
            children = [learner, policy, *envs]
            wait_for(lambda: streams() == 3, "three connected env servers", 240, children)
            before = updates()
            wait_for(lambda: updates() >= before + 2, "updates with three env servers", 240, children)

            for child in envs[:2]:  # kubectl scale --replicas=1: two pods get SIGTERM
                child.process.send_signal(signal.SIGTERM)
            for child in envs[:2]:
                assert child.process.wait(60) == 0, child.tail(40)
            children = [learner, policy, envs[2]]
            wait_for(lambda: streams() == 1, "the two env servers to be gone", 60, children)
            before = updates()
            wait_for(lambda: updates() >= before + 2, "the run to go on with one env server", 240, children)
            # env server i serves on env_port + i: the survivor is index 2
            exported = set().union(
                *(declared_series(metrics_text(p)) for p in (metrics_port, learner_port, env_port + 2))
            )
        finally:
            for child in [*envs, policy, learner]:  # the order the launcher uses: producers first
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
                    child.process.wait(120)
        produced = read_counter(client, keys.produced)
        consumed = read_counter(client, keys.consumed)
        dropped = read_counter(client, keys.dropped)
        in_stream = int(client.xlen(keys.stream))
        assert produced > 0 and consumed > 0
        assert produced == consumed + dropped + in_stream, (produced, consumed, dropped, in_stream)
        assert policy.process.returncode == 0 and learner.process.returncode == 0
        client.close()
    queried = set(re.findall(r"\bgsrl_[a-z0-9_]+", json.dumps(json.loads(DASHBOARD.read_text()))))
    assert queried, "the dashboard queries no gsrl metric"
    assert queried <= exported, f"dashboard queries metrics no running role exports: {sorted(queried - exported)}"
