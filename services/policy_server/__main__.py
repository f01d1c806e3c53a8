"""``python -m services.policy_server`` / ``gsrl policy-server``: parse config and environment, then serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from gsrl.cli import add_config_arguments, config_from_args, setup_logging
from gsrl.config import ConfigError
from services.policy_server.server import serve


def main(argv: Sequence[str] | None = None, prog: str = "gsrl policy-server") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the policy over gRPC to env servers, batch "
        "inference, and append trajectory segments to Redis.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("GSRL_REDIS_URL"),
        help="redis://host:port/db of the trajectory stream (env GSRL_REDIS_URL; default from config)",
    )
    parser.add_argument("--id", default=os.environ.get("POD_NAME"), help="stable server id (env POD_NAME)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "policy-server")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    torch.set_num_threads(int(os.environ.get("GSRL_TORCH_THREADS", "1")))
    redis_url = args.redis_url or f"redis://{config.redis.host}:{config.redis.port}/{config.redis.db}"
    serve(config, redis_url, server_id=args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
