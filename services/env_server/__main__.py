"""``python -m services.env_server`` / ``gsrl env-server``: parse config and environment, then serve."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gsrl.cli import add_config_arguments, parse_role_arguments
from gsrl.metrics import EnvServerMetrics, MetricsServer
from services.env_server.core import EnvBatch
from services.env_server.recorder import EpisodeRecorder
from services.env_server.server import EnvServer

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None, prog: str = "gsrl env-server") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a batch of ManiSkill envs and stream them to a policy server over gRPC."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--index",
        type=int,
        default=int(os.environ.get("GSRL_ENV_SERVER_INDEX", "0")),
        help="index of this env server: offsets its seed and metrics port (env GSRL_ENV_SERVER_INDEX)",
    )
    parser.add_argument(
        "--id",
        default=os.environ.get("POD_NAME") or f"env-{socket.gethostname()}-{os.getpid()}",
        help="stable id shown in logs (env POD_NAME)",
    )
    args, config = parse_role_arguments(parser, argv, "env-server {index}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # physics is single-threaded per env
    es, task = config.env_server, config.task
    # Pipelined stages split the envs into equal batches; `first_env` seeds each env as the unsplit batch would.
    per_stage = es.num_envs // es.pipeline_stages
    seed = config.run.seed * 1000 + args.index * es.num_envs
    batches: list[EnvBatch] = []
    try:
        for k in range(es.pipeline_stages):
            batches.append(EnvBatch.for_task(task, per_stage, seed=seed, first_env=k * per_stage))
    except BaseException:
        for made in batches:
            made.close()
        raise
    batch = batches[0]  # stage 0's: its env 0 is the one the recorder films
    if es.pipeline_stages > 1:
        log.info("%s: %d envs in %d pipelined stages of %d", args.id, es.num_envs, es.pipeline_stages, per_stage)
    metrics = EnvServerMetrics()
    metrics_server = None
    if es.metrics_port:
        metrics_server = MetricsServer(metrics.registry, es.metrics_port + args.index).start()
        metrics_server.ready.set()
    recorder = None
    if es.video_every_episodes:
        image_keys = sorted(k for k in batch.observation_spec if k.startswith("rgb/"))
        if image_keys:
            recorder = EpisodeRecorder(
                Path(es.video_dir or "videos") / args.id,
                es.video_every_episodes,
                image_keys[0],
                instruction=batch.instructions[0],
                info_on_video=es.info_on_video,
                fps=task.control_freq / config.policy.action_chunk,
            )
        else:
            log.warning("env_server.video_every_episodes is set but %s has no camera images; no videos", task.id)
    server = EnvServer(
        batches,
        es.policy_addresses,
        args.id,
        task.id,
        config.policy.action_chunk,
        metrics,
        backoff_s=es.reconnect_backoff_s,
        max_backoff_s=es.max_reconnect_backoff_s,
        log_every_s=config.run.log_every_s * 3,
        tls=config.tls,
        max_message_bytes=config.policy_server.max_message_bytes,
        recorder=recorder,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        server.run()
    finally:
        if recorder is not None:
            recorder.close()
        for made in batches:
            made.close()
        if metrics_server:
            metrics_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
