"""One policy-server stand-in for the weight-broadcast row: ``python -m bench._weights_peer``.

It is both ends' receiver at once, so that gsrl and its baseline reach the same processes in the same run:

- a ``WeightSubscriber`` (as a policy server runs it) that acknowledges every version it delivers;
- rank ``--rank`` of a plain process group of the same size (gloo, or NCCL on GPUs), built the same way, which
  receives ``--rounds`` broadcasts of one flat uint8 tensor of the same byte count and acknowledges each.

Acknowledgements are JSON pushed to Redis lists, stamped with ``time.time()`` when the bytes were usable (after a
CUDA synchronize on GPUs), so the bench measures "delivered to all" as the latest stamp minus its start.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import timedelta

import redis
import torch
import torch.distributed as dist

from bench.weights import ack_key, make_state, ready_key, state_nbytes, stop_key
from gsrl.weight_group import _broadcast, _new_process_group
from gsrl.weights import WeightSubscriber


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._weights_peer", description=__doc__)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--backend", choices=("gloo", "nccl"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    client = redis.Redis(port=args.redis_port)

    def usable() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.time()

    def on_weights(_tensors: dict[str, torch.Tensor], version: int) -> None:
        stamp = usable()
        client.rpush(ack_key(args.prefix, "gsrl"), json.dumps({"id": args.id, "version": version, "t": stamp}))

    subscriber = WeightSubscriber(
        client,
        args.id,
        make_state(args.mib, "meta"),
        on_weights,
        key_prefix=args.prefix,
        device=device,
        timeout_s=args.timeout_s,
        heartbeat_s=0.5,
        gloo_hostname="127.0.0.1",
    )
    subscriber.start()
    client.rpush(ready_key(args.prefix), args.id)  # alive and registered: the bench may now wait in the rendezvous
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=timedelta(seconds=args.timeout_s))
    pg = _new_process_group(
        args.backend, dist.PrefixStore("baseline/", store), args.rank, args.world, args.timeout_s, "127.0.0.1"
    )
    flat = torch.empty(state_nbytes(args.mib), dtype=torch.uint8, device=device)
    try:
        for round_index in range(args.rounds):
            _broadcast(pg, flat, args.timeout_s)
            stamp = usable()
            client.rpush(
                ack_key(args.prefix, "baseline"), json.dumps({"id": args.id, "round": round_index, "t": stamp})
            )
        client.blpop([stop_key(args.prefix, args.id)], timeout=int(args.timeout_s))
    finally:
        subscriber.stop()
        pg.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
