"""``gsrl.act_client`` against a real policy server on loopback, serving a GSEnv-shaped image + state policy.

The server is the production servicer and gRPC server (``build_grpc_server``) over a Gaussian policy with the
NatureCNN image encoder; only Redis is left out (Act produces no segments). The client's wire encoding is checked
byte for byte against ``gsrl.codec``, and its import is checked to stay free of torch, since it runs on robot
computers that have none.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gsrl import codec
from gsrl.act_client import (
    ActClient,
    PolicyServerError,
    PolicyServerUnavailable,
    decode_tensor,
    encode_tensor,
)
from gsrl.env_spec import EnvSpec
from gsrl.metrics import PolicyServerMetrics
from gsrl.policy import build_policy
from services.policy_server.core import InferenceBatcher, PolicyHost
from services.policy_server.server import PolicyServicer, build_grpc_server

CAMERA = "3rd_view_camera"
IMAGE_KEY = f"rgb/{CAMERA}"
# 64x64 rather than GSEnv's 128x128 to keep CPU inference quick; NatureCNN's three convolutions need at least 36.
HEIGHT = WIDTH = 64
STATE_DIM, ACTION_DIM, CHUNK, VERSION = 25, 7, 4, 3
SPEC = EnvSpec(
    {IMAGE_KEY: ((HEIGHT, WIDTH, 3), "uint8"), "state": ((STATE_DIM,), "float32")},
    ACTION_DIM,
    "put the cube on the plate",
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    torch.manual_seed(0)
    policy = build_policy(
        "gaussian_mlp", SPEC.observation_spec, ACTION_DIM, CHUNK, hidden_sizes=(32,), image_features=32
    )
    host = PolicyHost(policy, version=VERSION)
    metrics = PolicyServerMetrics()
    batcher = InferenceBatcher(host, max_batch_size=4, max_wait_s=0.002, metrics=metrics).start()
    servicer = PolicyServicer(batcher, SPEC, CHUNK, 8, None, metrics, "GSEnv-PutCubeOnPlate-v0")
    server, port = build_grpc_server(servicer, "127.0.0.1:0", max_workers=4)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=1).wait()
    batcher.stop()


def frame(seed: int = 0, size: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def state(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=STATE_DIM).astype(np.float32)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_act_returns_a_finite_chunk_of_the_policy_shape(address: str) -> None:
    with ActClient(address) as client:
        assert client.health() == "SERVING"
        result = client.act({CAMERA: frame()}, state(), "put the cube on the plate")
        assert result.action_chunk.shape == (CHUNK, ACTION_DIM) and result.action_chunk.dtype == np.float32
        assert np.isfinite(result.action_chunk).all() and np.isfinite(result.value)
        assert result.policy_version == VERSION and result.latency_s > 0
        result.action_chunk[0, 0] = 0.0  # the caller owns a writable array
        # Another camera frame changes the action: the image reaches the policy, not just the state.
        other = client.act({CAMERA: frame(seed=1)}, state(), "put the cube on the plate")
        assert not np.allclose(other.action_chunk, client.act({CAMERA: frame()}, state()).action_chunk)


def test_deterministic_act_repeats_and_accepts_a_flat_dict(address: str) -> None:
    with ActClient(address) as client:
        a = client.act({CAMERA: frame()}, state(), deterministic=True)
        b = client.act({CAMERA: frame()}, state(), deterministic=True)
        np.testing.assert_array_equal(a.action_chunk, b.action_chunk)
        # The flat server-key form, with a float64 state (what robot drivers hand out): cast, same answer.
        flat = client.act(observation={IMAGE_KEY: frame(), "state": state().astype(np.float64)})
        np.testing.assert_array_equal(flat.action_chunk, a.action_chunk)
        prefixed = client.act({IMAGE_KEY: frame()}, state())  # a camera may be named with its "rgb/" prefix
        np.testing.assert_array_equal(prefixed.action_chunk, a.action_chunk)
        sampled = [client.act({CAMERA: frame()}, state(), deterministic=False).action_chunk for _ in range(2)]
        assert not np.array_equal(sampled[0], sampled[1])


def test_bad_observations_name_the_key_and_the_server_keeps_serving(address: str) -> None:
    with ActClient(address) as client:
        with pytest.raises(PolicyServerError) as err:
            client.act({CAMERA: frame(size=(HEIGHT // 2, WIDTH // 2))}, state())
        assert err.value.code is not None and err.value.code.name == "INVALID_ARGUMENT"
        assert IMAGE_KEY in str(err.value) and "shape" in err.value.details and address in str(err.value)
        assert not isinstance(err.value, PolicyServerUnavailable)

        with pytest.raises(PolicyServerError) as err:
            client.act({"wrist_camera": frame()}, state())  # a camera the policy was not trained with
        assert "rgb/wrist_camera" in err.value.details and IMAGE_KEY in err.value.details

        nan_state = state()
        nan_state[3] = np.nan
        with pytest.raises(PolicyServerError, match="'state' contains NaN"):
            client.act({CAMERA: frame()}, nan_state)

        # Caught before sending: the client knows images are uint8 [H, W, 3].
        with pytest.raises(ValueError, match=f"image '{IMAGE_KEY}' has dtype float32"):
            client.act({CAMERA: frame().astype(np.float32) / 255}, state())
        with pytest.raises(ValueError, match="either images/state or observation"):
            client.act({CAMERA: frame()}, observation={"state": state()})

        assert client.act({CAMERA: frame()}, state()).action_chunk.shape == (CHUNK, ACTION_DIM)


def test_unreachable_server_is_a_clear_error_naming_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    with ActClient(address, timeout_s=5.0) as client:
        start = time.monotonic()
        with pytest.raises(PolicyServerUnavailable) as err:
            client.act({CAMERA: frame()}, state())
        assert time.monotonic() - start < 5.0  # a refused connection fails fast, not at the deadline
        assert err.value.code is not None and err.value.code.name == "UNAVAILABLE"
        assert f"cannot reach the policy server at {address}" in str(err.value)
        with pytest.raises(PolicyServerUnavailable, match=address):
            client.health()
        with pytest.raises(PolicyServerUnavailable, match=f"cannot connect to the policy server at {address}"):
            client.wait_until_ready(timeout_s=0.5)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(6, dtype=">f4"),  # big-endian input travels little-endian
        np.arange(6, dtype=np.float64)[::2],  # non-contiguous
        np.arange(5, dtype=np.int64),
        np.arange(5, dtype=">i4"),
        np.array([True, False]),
        frame()[:2, :3],
        np.zeros((0, 3), np.float16),
    ],
)
def test_wire_encoding_matches_gsrl_codec(array: np.ndarray) -> None:
    ours, reference = encode_tensor(array), codec.encode(array)
    assert ours.SerializeToString() == reference.SerializeToString()
    np.testing.assert_array_equal(decode_tensor(reference), codec.to_numpy(reference))


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, gsrl.act_client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_example_runs_a_control_loop_against_the_server(address: str, tmp_path: Path) -> None:
    image = tmp_path / "frame.npy"
    np.save(image, frame())
    command = [sys.executable, str(REPO / "examples" / "act_client_example.py"), "--address", address]
    command += ["--image", str(image), "--rate-hz", "20", "--steps", "3", "--instruction", "put the cube on the plate"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"connected to {address}: health SERVING"
    assert sum(line.startswith("step ") for line in lines) == 3
    assert f"chunk [{CHUNK}, {ACTION_DIM}]" in lines[1] and f"v{VERSION}" in lines[1] and "latency" in lines[1]
    assert lines[-1].startswith("3 calls: latency p50")

    # A frame of the wrong size: the server's message reaches the operator and the exit code says it failed.
    command[command.index("--image") + 1] = str(tmp_path / "small.npy")
    np.save(tmp_path / "small.npy", frame(size=(16, 16)))
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and IMAGE_KEY in done.stderr and "INVALID_ARGUMENT" in done.stderr
