"""``python -m services.policy_server`` / ``gsrl policy-server``: parse config and environment, then serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from gsrl.cli import add_config_arguments, add_redis_url_argument, parse_role_arguments, redis_url_of
from services.policy_server.server import serve


def main(argv: Sequence[str] | None = None, prog: str = "gsrl policy-server") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the policy over gRPC to env servers, batch "
        "inference, and append trajectory segments to Redis.",
    )
    add_config_arguments(parser)
    add_redis_url_argument(parser)
    parser.add_argument("--id", default=os.environ.get("POD_NAME"), help="stable server id (env POD_NAME)")
    args, config = parse_role_arguments(parser, argv, "policy-server")
    torch.set_num_threads(int(os.environ.get("GSRL_TORCH_THREADS", "1")))
    serve(config, redis_url_of(args, config), server_id=args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
