"""``gsrl train``: the whole loop on one machine, every role a separate process, as pods would run it.

Starts a private redis-server in the run directory, the learner ranks, the policy servers
(``policy_server.num_servers``, the env servers spread over them) and the env servers from one config;
prints a progress line; and shuts everything down in an order that loses nothing (env servers first,
then policy servers flush their partial segments, then the learners checkpoint, then Redis) at the end
of the budget or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gsrl.cli import add_config_arguments, parse_role_arguments
from gsrl.config import Config, ConfigError, dump_config
from gsrl.placement import (
    ENV_SERVER,
    LEARNER,
    POLICY_SERVER,
    GpuPlan,
    plan_for,
    renders_with_sapien,
    visible_gpu_names,
    without_vulkan_drivers,
)
from gsrl.redis_conn import configure_local, connect
from gsrl.redis_server import LocalRedis, free_port
from gsrl.stream import StreamKeys, read_counter

log = logging.getLogger("gsrl.train")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    role: str

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Fleet:
    """The child processes of a run, stopped role by role."""

    children: list[Child] = field(default_factory=list)

    def by_role(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role]

    def stop_role(self, role: str, timeout_s: float) -> None:
        members = [c for c in self.by_role(role) if c.process.poll() is None]
        for child in members:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in members:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, timeout_s)
                child.process.kill()
                child.process.wait()


def effective_config(config: Config, redis_port: int) -> Config:
    """Fill in the ports of this machine's run: free ones where the config leaves them to us."""
    policy_port = free_port()
    overrides = [
        f"redis.port={redis_port}",
        f"policy_server.port={policy_port}",
        f"env_server.policy_address=127.0.0.1:{policy_port}",
        f"learner.master_port={free_port()}",
    ]
    return config.with_overrides(overrides)


def policy_ports(config: Config) -> list[int]:
    """One gRPC port per policy server (``policy_server.num_servers``), the config's ``policy_server.port`` first."""
    return [config.policy_server.port, *(free_port() for _ in range(config.policy_server.num_servers - 1))]


def policy_address_for(policy_ports: Sequence[int], env_server_index: int) -> str:
    """Env server ``i`` streams to policy server ``i mod n``: the env servers split evenly over the policy servers.

    One address each, not the whole list: an env server with several moves on after 3 s without an answer
    (``EnvServer.run``), so env servers that start before a slow policy server (a VLA checkpoint loading) would
    pile onto whichever answered first and stay there. A policy server that dies ends a local run anyway.
    """
    return f"127.0.0.1:{policy_ports[env_server_index % len(policy_ports)]}"


def gpu_plan(config: Config, environ: Mapping[str, str]) -> tuple[GpuPlan, list[str]]:
    """Where each child computes: ``placement`` over the GPUs this process sees, and how children name them.

    Counting goes through NVML (``torch.cuda.device_count``), so this process opens no CUDA context; a CPU build of
    torch counts 0 and nothing is placed.
    """
    import torch

    names = visible_gpu_names(environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    count = config.placement.gpus or len(names)
    if count > len(names):
        raise ConfigError("placement.gpus", f"{count} GPU(s) asked for, but this machine shows {len(names)}")
    return plan_for(config, count, policy_servers=config.policy_server.num_servers), names[:count]


def with_gpus(
    env: dict[str, str], plan: GpuPlan, names: list[str], role: str, index: int, *, renders: bool = False
) -> dict[str, str]:
    """A child's environment with its ``CUDA_VISIBLE_DEVICES`` from the plan; unchanged on a machine without GPUs.

    A child placed on the CPU of a GPU host also gets no Vulkan driver unless it ``renders`` with SAPIEN
    (``gsrl.placement.without_vulkan_drivers``): SAPIEN would otherwise open the NVIDIA Vulkan driver with CUDA
    hidden, as the state env servers did that died with signal 11 on an H100 host. A machine without GPUs keeps
    its Vulkan drivers (Mesa's CPU driver there is what renders).
    """
    if plan.num_gpus == 0:
        return env
    child = {**env, "CUDA_VISIBLE_DEVICES": plan.cuda_visible_devices(role, index, names)}
    if not plan.devices(role, index) and not renders:
        child = without_vulkan_drivers(child)
    return child


def child_environment(environ: Mapping[str, str], redis_url: str, run_dir: Path) -> dict[str, str]:
    """The environment every child starts from: this process's, the run's Redis and directory, one thread, and
    ``PYTHONFAULTHANDLER`` so a crash in native code (SAPIEN, a GPU driver) writes the Python stack of every thread
    into the role's log instead of leaving it empty."""
    return {
        **environ,
        "GSRL_REDIS_URL": redis_url,
        "GSRL_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
    }


def describe_exit(returncode: int) -> str:
    """``code 1``, or for a child killed by a signal ``code -11 (SIGSEGV: killed by a signal; ...)``."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"code {returncode} ({name}: killed by a signal; a native crash prints the Python stack in its log)"


def spawn(role: str, name: str, args: list[str], env: dict[str, str], logs: Path) -> Child:
    log_path = logs / f"{name}.log"
    handle = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{role}", *args],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    return Child(name, process, log_path, role)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressLine:
    """One line per period: iteration, env steps/s, success, return, ETA (from the learner's record in Redis)."""

    def __init__(self, client: redis.Redis, config: Config, started: float) -> None:
        self.client = client
        self.config = config
        self.started = started
        self.keys = StreamKeys(config.redis.key_prefix, config.redis.stream)
        self.last_steps = 0
        self.last_time = started

    def env_steps(self) -> int:
        return read_counter(self.client, self.keys.env_steps)

    def line(self) -> str:
        now = time.monotonic()
        record = {
            k.decode(): v.decode()
            for k, v in self.client.hgetall(f"{self.config.redis.key_prefix}:stats:learner").items()
        }
        steps = self.env_steps()
        rate = (steps - self.last_steps) / max(now - self.last_time, 1e-9)
        self.last_steps, self.last_time = steps, now
        updates = int(record.get("updates", 0))
        elapsed = now - self.started
        run = self.config.run
        etas = []
        if run.duration_s:
            etas.append(run.duration_s - elapsed)
        if run.max_updates and updates:
            etas.append((run.max_updates - updates) * elapsed / updates)
        eta = min(etas) if etas else float("nan")

        def num(name: str, fmt: str) -> str:
            return format(float(record[name]), fmt) if name in record else "-"

        return (
            f"iter {updates:5d} | v{record.get('policy_version', '0')} | env steps {steps:8d} ({rate:6.1f}/s) | "
            f"success {num('env/success_once', '.2f')} | return {num('env/return', '.2f')} | "
            f"ep len {num('env/episode_len', '.1f')} | loss {num('actor/loss', '.3f')} | "
            f"dropped {record.get('segments_dropped', '0')} | elapsed {format_eta(elapsed)} | ETA {format_eta(eta)}"
        )


def summarize(client: redis.Redis, config: Config) -> dict[str, object]:
    keys = StreamKeys(config.redis.key_prefix, config.redis.stream)
    record = {k.decode(): v.decode() for k, v in client.hgetall(f"{config.redis.key_prefix}:stats:learner").items()}
    return {
        "learner": record,
        "segments_produced": read_counter(client, keys.produced),
        "segments_consumed": read_counter(client, keys.consumed),
        "segments_dropped": read_counter(client, keys.dropped),
        "segments_in_stream": int(client.xlen(keys.stream)),
        "env_steps": read_counter(client, keys.env_steps),
    }


def train(config: Config, run_dir: Path) -> int:
    run_dir = run_dir.resolve()  # children run with cwd at the repository root
    plan, gpu_names = gpu_plan(config, os.environ)  # a preset the GPUs cannot satisfy stops before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    local_redis = None
    if config.redis.start_local:
        local_redis = LocalRedis(run_dir / "redis", port=config.redis.port or 0).start()
        redis_port = local_redis.port
        # fsync policy and password are applied right after start (before any role connects)
        configure_local(
            redis.Redis(port=redis_port), appendfsync=config.redis.appendfsync, password=config.redis.password
        )
    else:
        redis_port = config.redis.port
    config = effective_config(config, redis_port)
    if config.env_server.video_every_episodes and not config.env_server.video_dir:
        config = config.with_overrides([f"env_server.video_dir={run_dir / 'videos' / 'train'}"])
    if plan.policy_on_broadcast_root_gpu() and config.learner.broadcast_backend == "auto":
        # NCCL refuses two members of one group on one GPU: the policy server shares learner rank 0's here.
        config = config.with_overrides(["learner.broadcast_backend=gloo"])
    if plan.num_gpus:
        log.info("GPU placement %s over %d GPU(s): %s", plan.preset, plan.num_gpus, plan.describe())
        log.info("roles placed on the CPU see no GPU and, unless they render with SAPIEN, no Vulkan driver")
    dump_config(config, run_dir / "config.yaml")
    redis_url = f"redis://{config.redis.host}:{redis_port}/{config.redis.db}"
    client = connect(redis_url, config.redis.password)
    env = child_environment(os.environ, redis_url, run_dir)
    common = ["--config", str(run_dir / "config.yaml")]
    fleet = Fleet()
    stopping = False

    def _interrupt(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("interrupted: shutting down (env servers, policy servers, learners, redis)")

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    exit_code = 0
    try:
        world = config.learner.world_size
        for rank in range(world):
            rank_env = {
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(config.learner.master_port),
            }
            rank_env = with_gpus(rank_env, plan, gpu_names, LEARNER, rank)
            fleet.children.append(spawn("learner", f"learner-{rank}", common, rank_env, logs))
        ports = policy_ports(config)
        for i, port in enumerate(ports):
            policy_env = with_gpus(env, plan, gpu_names, POLICY_SERVER, i)
            own = [f"policy_server.port={port}"]
            if i and config.policy_server.metrics_port:  # one metrics port each, as env servers have
                own.append(f"policy_server.metrics_port={config.policy_server.metrics_port + i}")
            fleet.children.append(
                spawn("policy_server", f"policy-server-{i}", [*common, "--id", f"policy-{i}", *own], policy_env, logs)
            )
        for i in range(config.env_server.num_servers):
            env_i = with_gpus(env, plan, gpu_names, ENV_SERVER, i, renders=renders_with_sapien(config, ENV_SERVER))
            args = ["--index", str(i), "--id", f"env-{i}"]
            if len(ports) > 1:
                args.append(f"env_server.policy_address={policy_address_for(ports, i)}")
            fleet.children.append(spawn("env_server", f"env-server-{i}", [*common, *args], env_i, logs))
        log.info("run directory %s; logs in %s; tensorboard --logdir %s", run_dir, logs, run_dir / "tensorboard")
        progress = ProgressLine(client, config, started)
        next_line = started + config.run.log_every_s
        hard_stop = started + config.run.duration_s + 300 if config.run.duration_s else float("inf")
        while not stopping:
            time.sleep(0.5)
            learners = fleet.by_role("learner")
            if all(c.process.poll() is not None for c in learners):
                failed = [c for c in learners if c.process.returncode != 0]
                if failed:
                    exit_code = 1
                    log.error(
                        "%s exited with %s:\n%s",
                        failed[0].name,
                        describe_exit(failed[0].process.returncode),
                        failed[0].tail(),
                    )
                else:
                    log.info("learner finished")
                break
            dead = [c for c in fleet.children if c.role != "learner" and c.process.poll() is not None]
            if dead:
                exit_code = 1
                log.error(
                    "%s exited with %s:\n%s", dead[0].name, describe_exit(dead[0].process.returncode), dead[0].tail()
                )
                break
            if time.monotonic() >= next_line:
                print(progress.line(), flush=True)
                next_line += config.run.log_every_s
            if time.monotonic() > hard_stop:
                log.warning("learner still running 300s past the budget; stopping")
                break
    finally:
        fleet.stop_role("env_server", 30)
        fleet.stop_role("policy_server", 30)
        fleet.stop_role("learner", 120)
        summary = summarize(client, config)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        client.close()
        if local_redis is not None:
            local_redis.stop()
    learner = summary["learner"]
    print(
        f"done: {learner.get('updates', 0)} updates, policy version {learner.get('policy_version', 0)}, "
        f"{summary['env_steps']} env steps, segments produced {summary['segments_produced']} = consumed "
        f"{summary['segments_consumed']} + dropped {summary['segments_dropped']} + in stream "
        f"{summary['segments_in_stream']}; run directory {run_dir}",
        flush=True,
    )
    return exit_code


def main(argv: Sequence[str] | None = None, prog: str = "gsrl train") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train on this machine: a private redis-server, the "
        "learner, a policy server and env servers as processes, from one config.",
    )
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="run directory (default: <run.output_dir>/<run.name>-<time>)")
    args, config = parse_role_arguments(parser, argv, "train")
    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else (Path(config.run.output_dir) / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    return train(config, run_dir)


if __name__ == "__main__":
    sys.exit(main())
