"""Drive a policy server the way a robot controller would: observe, ask for an action chunk, act, at a fixed rate.

Start a policy server first (``gsrl policy-server -c CONFIG``), then for example

    python examples/act_client_example.py --address 127.0.0.1:50051 --image frame.png --size 128x128 \\
        --instruction "put the cube on the plate" --rate-hz 5 --steps 20

Without ``--image`` it sends a synthetic frame (a gradient with a moving square, so consecutive frames differ); the
state is random unless ``--state`` gives a .npy file. On a robot, replace ``read_camera`` / ``read_state`` with the
drivers and send ``result.action_chunk`` ([C, A] in the env's normalized action space [-1, 1]) to the arm. Needs
only grpc and numpy (Pillow to read PNG/JPEG files), not torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gsrl.act_client import ActClient, ClientTLS, PolicyServerError


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 128x128) -> (H, W)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 128x128, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return height, width


def load_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """An image file (PNG/JPEG through Pillow, or a uint8 [H, W, 3] .npy) -> uint8 [H, W, 3], resized to ``size``.

    The server refuses frames of another size than it was trained on, so resizing here is the usual fix.
    """
    if path.suffix == ".npy":
        frame = np.load(path)
        if size is not None and frame.shape[:2] != size:
            raise SystemExit(f"{path}: frame is {frame.shape[:2]}, --size says {size}; resize .npy frames beforehand")
        return np.ascontiguousarray(frame, dtype=np.uint8)
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"reading {path} needs Pillow (pip install pillow), or pass a uint8 [H, W, 3] .npy") from None
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def synthetic_frame(size: tuple[int, int], step: int) -> np.ndarray:
    """A gradient with a square that moves each step: a stand-in camera that needs no hardware."""
    height, width = size
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    frame[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    side = max(1, min(height, width) // 6)
    top, left = (step * 2) % max(1, height - side), (step * 3) % max(1, width - side)
    frame[top : top + side, left : left + side] = (255, 255, 255)
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="policy server host:port (or dns:///name:port)")
    parser.add_argument("--camera", default="3rd_view_camera", help="camera name; sent as observation 'rgb/<camera>'")
    parser.add_argument("--image", type=Path, help="image file (PNG/JPEG, or uint8 [H, W, 3] .npy); default synthetic")
    parser.add_argument("--size", type=parse_size, help="HxW the policy was trained on (synthetic frame: 128x128)")
    parser.add_argument("--state", type=Path, help=".npy with the proprioceptive state [D]; default random")
    parser.add_argument("--state-dim", type=int, default=25, help="size of the random state (GSEnv: 25)")
    parser.add_argument("--instruction", default="", help="language instruction ('' = the server task's own)")
    parser.add_argument("--rate-hz", type=float, default=5.0, help="control loop rate: one Act call per tick")
    parser.add_argument("--steps", type=int, default=10, help="loop iterations (0 = until Ctrl-C)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of the policy's mean")
    parser.add_argument("--tls", action="store_true", help="the server runs with tls.enabled")
    parser.add_argument("--ca-file", default="", help="CA bundle to verify the server (TLS; '' = system roots)")
    parser.add_argument("--server-name", default="", help="name in the server certificate (TLS)")
    args = parser.parse_args(argv)
    if args.rate_hz <= 0:
        parser.error("--rate-hz must be > 0")

    size = args.size or (128, 128)
    fixed_frame = load_image(args.image, args.size) if args.image else None
    rng = np.random.default_rng(0)
    fixed_state = np.load(args.state).astype(np.float32) if args.state else None
    tls = ClientTLS(args.ca_file, args.server_name) if args.tls else None

    def read_camera(step: int) -> np.ndarray:
        return fixed_frame if fixed_frame is not None else synthetic_frame(size, step)

    def read_state() -> np.ndarray:
        if fixed_state is not None:
            return fixed_state
        return rng.normal(scale=0.1, size=args.state_dim).astype(np.float32)

    period = 1.0 / args.rate_hz
    latencies: list[float] = []
    with ActClient(args.address, timeout_s=args.timeout_s, tls=tls) as client:
        try:
            client.wait_until_ready()
            print(f"connected to {args.address}: health {client.health()}")
            next_tick = time.monotonic()
            step = 0
            while args.steps == 0 or step < args.steps:
                result = client.act(
                    {args.camera: read_camera(step)},
                    read_state(),
                    args.instruction,
                    deterministic=not args.stochastic,
                )
                latencies.append(result.latency_s)
                # A robot would execute result.action_chunk here (C steps of A-dim actions).
                first = np.array2string(result.action_chunk[0], precision=3, suppress_small=True)
                print(
                    f"step {step:4d} | chunk {list(result.action_chunk.shape)} first action {first} | "
                    f"v{result.policy_version} value {result.value:+.3f} | latency {result.latency_s * 1000:.1f} ms"
                )
                step += 1
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:  # overran the tick: start the next one now instead of bursting to catch up
                    print(f"  tick overrun by {-delay * 1000:.1f} ms (rate {args.rate_hz:g} Hz)", file=sys.stderr)
                    next_tick = time.monotonic()
        except PolicyServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    if latencies:
        ms = np.array(latencies) * 1000
        print(
            f"{len(ms)} calls: latency p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
            f"max {ms.max():.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
