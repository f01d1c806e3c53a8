"""A policy-server stand-in for test_weights.py: one WeightSubscriber in its own process.

Run as ``python _weights_subscriber.py REDIS_PORT KEY_PREFIX SUBSCRIBER_ID [--mismatch] [--device cuda:1]``.
It reports through the Redis list ``{prefix}:test:events:{id}`` (JSON: started / weights / refused / stopped)
and stops once ``{prefix}:test:stop:{id}`` exists, so the test needs no pipes and can SIGKILL it at any moment.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import redis
import torch

from gsrl.weights import WeightSubscriber


def make_state(version: int, *, mismatch: bool = False) -> dict[str, torch.Tensor]:
    """Weights whose every element encodes the version and its own position, so any mix-up shows.

    Sizes are chosen against a 4 KiB bucket: float32 needs two buckets, the int64 tensor alone exceeds one.
    ``mismatch`` transposes one shape: same byte count, different layout, which only the layout hash can catch.
    """
    return {
        "layer1.weight": (torch.arange(32 * 16, dtype=torch.float32) + 1000 * version).reshape(32, 16),
        "layer1.bias": torch.full((16,), float(version)),
        "layer2.weight": (torch.arange(64 * 16, dtype=torch.float32) - 1000 * version).reshape(
            (16, 64) if mismatch else (64, 16)
        ),
        "steps": torch.arange(600, dtype=torch.int64) + 100_000 * version,
        "scale": torch.full((8,), float(version), dtype=torch.bfloat16),
        "mask": (torch.arange(7) + version) % 2 == 0,
    }


def events_key(key_prefix: str, subscriber_id: str) -> str:
    return f"{key_prefix}:test:events:{subscriber_id}"


def stop_key(key_prefix: str, subscriber_id: str) -> str:
    return f"{key_prefix}:test:stop:{subscriber_id}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_port", type=int)
    parser.add_argument("key_prefix")
    parser.add_argument("subscriber_id")
    parser.add_argument("--mismatch", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--device", default="cpu", help="where delivered weights must live (cuda:N: NCCL groups)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.subscriber_id} %(levelname)s %(message)s"
    )
    client = redis.Redis(port=args.redis_port)
    events = events_key(args.key_prefix, args.subscriber_id)

    def on_weights(tensors: dict[str, torch.Tensor], version: int) -> None:
        expected = make_state(version, mismatch=args.mismatch)
        ok = tensors.keys() == expected.keys() and all(torch.equal(tensors[k].cpu(), expected[k]) for k in expected)
        devices = sorted({str(t.device) for t in tensors.values()})
        client.rpush(events, json.dumps({"event": "weights", "version": version, "ok": ok, "devices": devices}))

    subscriber = WeightSubscriber(
        client,
        args.subscriber_id,
        make_state(0, mismatch=args.mismatch),
        on_weights,
        key_prefix=args.key_prefix,
        device=device,
        timeout_s=args.timeout_s,
        heartbeat_s=0.3,
        gloo_hostname="127.0.0.1",
    )
    snapshot_version = subscriber.start()
    client.rpush(events, json.dumps({"event": "started", "snapshot_version": snapshot_version}))
    refused = 0
    while not client.exists(stop_key(args.key_prefix, args.subscriber_id)):
        if subscriber.refused_count != refused:
            refused = subscriber.refused_count
            client.rpush(events, json.dumps({"event": "refused", "count": refused}))
        time.sleep(0.05)
    subscriber.stop()
    client.rpush(
        events,
        json.dumps({"event": "stopped", "version": subscriber.version, "refused": subscriber.refused_count}),
    )


if __name__ == "__main__":
    main()
