"""One policy-server stand-in for the weight-broadcast row: ``python -m bench._weights_peer``.

It is both ends' receiver at once, so that gsrl and its baseline reach the same processes in the same run:

- a ``WeightSubscriber`` (as a policy server runs it) that acknowledges every version it delivers;
- rank ``--rank`` of a plain process group of the same size (gloo, or NCCL on GPUs), built the same way, which
  receives ``--rounds`` broadcasts of one flat uint8 tensor of the same byte count and acknowledges each.

Acknowledgements are JSON pushed to Redis lists, stamped with ``time.time()`` when the bytes were usable (on GPUs
after synchronizing the stream that received them, never the whole device: see below), so the bench measures
"delivered to all" as the latest stamp minus its start.

Over NCCL the two communicators share this GPU and must never have work in flight at once, so the bench passes
``--on-go``: each baseline receive is posted only when the bench pushes ``go`` (after the publish before it is
acknowledged), right after pushing ``armed``. Over gloo the receives are posted ahead, one after another. A
device-wide ``torch.cuda.synchronize`` in ``on_weights`` used to wait for the next baseline receive, already posted,
which rank 0 starts only after that very acknowledgement: a deadlock on 2 x H100.
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

from bench.weights import ack_key, close_group, go_key, make_state, ready_key, state_nbytes, stop_key
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
    parser.add_argument("--on-go", action="store_true", help="post each baseline receive only on go (the NCCL way)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    client = redis.Redis(port=args.redis_port)

    def say(message: str) -> None:
        print(f"{args.id}: {message}", flush=True)  # the bench shows this log's tail when the peer is silent

    def usable() -> float:
        """When the received bytes are usable: this thread's stream (which waited on the broadcast) is done."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return time.time()

    def on_weights(_tensors: dict[str, torch.Tensor], version: int) -> None:
        stamp = usable()
        client.rpush(ack_key(args.prefix, "gsrl"), json.dumps({"id": args.id, "version": version, "t": stamp}))
        say(f"delivered v{version}")

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
    say(f"subscriber started on {device}; joining the baseline {args.backend} group as rank {args.rank}")
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=timedelta(seconds=args.timeout_s))
    pg = _new_process_group(
        args.backend, dist.PrefixStore("baseline/", store), args.rank, args.world, args.timeout_s, "127.0.0.1"
    )
    flat = torch.empty(state_nbytes(args.mib), dtype=torch.uint8, device=device)
    stop = stop_key(args.prefix, args.id)
    try:
        for round_index in range(args.rounds):
            if args.on_go:
                item = client.blpop([go_key(args.prefix, args.id), stop], timeout=int(args.timeout_s))
                if item is None:
                    raise TimeoutError(f"no go for baseline round {round_index} within {args.timeout_s:.0f} s")
                if item[0].decode() == stop:
                    say(f"stopped before baseline round {round_index}")
                    return 0
                client.rpush(ack_key(args.prefix, "armed"), json.dumps({"id": args.id, "round": round_index}))
            say(f"baseline round {round_index}: receiving")
            _broadcast(pg, flat, args.timeout_s)
            stamp = usable()
            client.rpush(
                ack_key(args.prefix, "baseline"), json.dumps({"id": args.id, "round": round_index, "t": stamp})
            )
        say("all baseline rounds received; waiting for stop")
        client.blpop([stop], timeout=int(args.timeout_s))
    finally:
        subscriber.stop()
        close_group(pg, args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
