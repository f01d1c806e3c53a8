"""``python -m services.env_server`` / ``gsrl env-server``: parse config and environment, then serve.

Start-up is never silent: ``main`` turns ``faulthandler`` on first (``gsrl train`` also starts every role with
``PYTHONFAULTHANDLER=1``), so a crash in native code (SAPIEN, a Vulkan or CUDA driver) prints the Python stack of
every thread to stderr, the role's log; and the heavy imports (torch, ManiSkill and SAPIEN, gRPC) happen only after
logging is set up and a line says what comes next. Importing this module loads none of them.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gsrl.cli import add_config_arguments, parse_role_arguments
from gsrl.metrics import EnvServerMetrics, MetricsServer

if TYPE_CHECKING:
    from services.env_server.core import EnvBatch

log = logging.getLogger(__name__)
# What decides which devices SAPIEN and CUDA can open, logged at start-up.
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "VK_DRIVER_FILES", "VK_ICD_FILENAMES", "VK_ADD_DRIVER_FILES")


def _device_environment() -> str:
    return ", ".join(f"{name}={os.environ[name]!r}" for name in DEVICE_VARIABLES if name in os.environ) or "defaults"


def _enable_faulthandler() -> None:
    """Print the Python stack to stderr on a fatal signal; kept if already on (``PYTHONFAULTHANDLER``, pytest)."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):  # a stderr without a file descriptor (captured in-process)
        log.debug("faulthandler not enabled: stderr has no file descriptor")


def main(argv: Sequence[str] | None = None, prog: str = "gsrl env-server") -> int:
    _enable_faulthandler()  # before any native code loads: a segfault then leaves a Python stack in the log
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
    es, task = config.env_server, config.task
    log.info("%s: task %s, %d envs; devices: %s", args.id, task.id, es.num_envs, _device_environment())
    log.info("importing torch, ManiSkill and SAPIEN")
    import torch

    from services.env_server.core import EnvBatch
    from services.env_server.recorder import EpisodeRecorder
    from services.env_server.server import EnvServer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # physics is single-threaded per env
    log.info("building %d envs of %s (the first Vulkan and SAPIEN device probes happen here)", es.num_envs, task.id)
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
    else:
        log.info("%s: %d envs built", args.id, es.num_envs)
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
