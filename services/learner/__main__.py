"""``python -m services.learner`` / ``gsrl learner``: one DeepSpeed rank; RANK/WORLD_SIZE/MASTER_* from the
environment (torchrun, the StatefulSet, or ``gsrl train`` set them)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from gsrl.cli import add_config_arguments, add_redis_url_argument, parse_role_arguments, redis_url_of


def main(argv: Sequence[str] | None = None, prog: str = "gsrl learner") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run one learner rank: read segments from Redis, "
        "PPO with DeepSpeed, checkpoint, broadcast weights to policy servers.",
    )
    add_config_arguments(parser)
    add_redis_url_argument(parser)
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("GSRL_RUN_DIR"),
        help="where TensorBoard logs and checkpoints go (env GSRL_RUN_DIR)",
    )
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args, config = parse_role_arguments(parser, argv, f"learner {rank}")
    if world_size != config.learner.world_size:
        parser.error(f"WORLD_SIZE={world_size} but config key 'learner.world_size' is {config.learner.world_size}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(config.learner.master_port))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    # A timed-out NCCL broadcast to a dead policy server must raise, not tear the learner down.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    use_cuda = config.learner.device == "cuda" or (config.learner.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(int(os.environ.get("GSRL_TORCH_THREADS", "1")))
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = config.learner.backend if config.learner.backend != "auto" else ("nccl" if use_cuda else "gloo")

    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    from services.learner.checkpoint import CheckpointError
    from services.learner.server import serve

    redis_url = redis_url_of(args, config)
    run_dir = args.run_dir or os.path.join(config.run.output_dir, config.run.name)
    try:
        serve(config, redis_url, run_dir, rank, world_size)
    except CheckpointError as exc:
        print(f"{prog}: cannot resume: {exc}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear DeepSpeed's group down before exit: left to the interpreter's teardown, NCCL may wait on ranks that have
    already gone, and the process never exits. Every rank stops after the same update (the stop flag is
    all-reduced), so they all get here; ``abort`` instead of a collective teardown keeps a lone survivor from
    waiting on the others."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.4
        if dist.get_backend() == "nccl" and abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - teardown at exit: report, never mask the run's own outcome
        print(f"learner: process group teardown failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
