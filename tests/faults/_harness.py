"""Each role as its own process against a real redis-server, as pods run them: the fault tests' shared rig."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import redis
from _tiny_run import TINY_RUN

from gsrl.config import Config, dump_config, load_config
from gsrl.launcher import Child, effective_config, spawn
from gsrl.redis_server import LocalRedis
from gsrl.stream import StreamKeys, read_counter

SMALL = [
    *TINY_RUN,
    "algo.max_policy_lag=3",
    "policy_server.metrics_port=0",
    "env_server.reconnect_backoff_s=0.5",
    "run.duration_s=0",
]


def durable_redis(tmp_path: Path) -> LocalRedis:
    """A LocalRedis whose append-only file is fsynced on every write (survives kill -9 of Redis)."""
    wrapper = tmp_path / "redis-server-always"
    wrapper.write_text('#!/bin/sh\nexec redis-server "$@" --appendfsync always\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return LocalRedis(tmp_path / "redis", executable=str(wrapper))


class Rig:
    """Config, environment and child processes of one fault-test run."""

    def __init__(self, tmp_path: Path, local_redis: LocalRedis, overrides: tuple[str, ...] = ()) -> None:
        self.tmp_path = tmp_path
        self.redis = local_redis
        self.config: Config = effective_config(
            load_config("configs/state_ppo.yaml", [*SMALL, *overrides]), local_redis.port
        )
        self.config_path = tmp_path / "run.yaml"
        dump_config(self.config, self.config_path)
        self.client = redis.Redis(port=local_redis.port, socket_connect_timeout=2)
        self.keys = StreamKeys(self.config.redis.key_prefix, self.config.redis.stream)
        self.run_dir = tmp_path / "run"
        self.env = {
            **os.environ,
            "GSRL_REDIS_URL": local_redis.url,
            "GSRL_RUN_DIR": str(self.run_dir),
            "OMP_NUM_THREADS": "1",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.config.learner.master_port),
        }
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.children: list[Child] = []

    def spawn(self, role: str, name: str, *args: str) -> Child:
        child = spawn(role, name, ["--config", str(self.config_path), *args], self.env, self.logs)
        self.children.append(child)
        return child

    def env_server(self, index: int) -> Child:
        return self.spawn("env_server", f"env-{index}", "--index", str(index), "--id", f"env-{index}")

    def live(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is None]

    def updates(self) -> int:
        return int(self.client.hget(f"{self.config.redis.key_prefix}:stats:learner", "updates") or 0)

    def policy_version(self) -> int:
        return int(self.client.get(self.keys.policy_version) or 0)

    def env_steps(self) -> int:
        return read_counter(self.client, self.keys.env_steps)

    def counts(self) -> dict[str, int]:
        return {
            "produced": read_counter(self.client, self.keys.produced),
            "consumed": read_counter(self.client, self.keys.consumed),
            "dropped": read_counter(self.client, self.keys.dropped),
            "in_stream": int(self.client.xlen(self.keys.stream)),
        }

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        watched = self.live()
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.ConnectionError:
                pass
            for child in watched:
                assert child.process.poll() is None, f"{child.name} exited early:\n{child.tail(40)}"
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.tails()}")

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {c.name}\n{c.tail(lines)}" for c in self.children)

    def stop_all(self) -> None:
        """SIGTERM in the launcher's order (producers first), so partial segments are flushed."""
        for role in ("env_server", "policy_server", "learner"):
            for child in [c for c in self.live() if c.role == role]:
                child.process.send_signal(signal.SIGTERM)
            for child in [c for c in self.children if c.role == role]:
                try:
                    child.process.wait(60)
                except Exception:  # noqa: BLE001 - a stuck child must not hide the assertion that follows
                    child.process.kill()
                    child.process.wait()

    def close(self) -> None:
        for child in self.live():
            child.process.kill()
            child.process.wait()
        self.client.close()
