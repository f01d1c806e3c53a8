"""A small client for the policy server's unary ``Act``: camera frames, state and instruction in, one action chunk out.

This is what runs next to a real robot (or any other controller outside the training loop), so it needs only grpc,
numpy and the generated ``gsrl.v1`` messages: no torch, no config loading, no Redis. Tensors are built with numpy
directly, in exactly ``gsrl.codec``'s wire format (little-endian, C-contiguous raw bytes), because importing
``gsrl.codec`` would pull torch onto the robot computer.

    with ActClient("policy-server:50051") as client:
        result = client.act({"3rd_view_camera": frame}, state, "put the cube on the plate")
        robot.execute(result.action_chunk)  # [C, A] float32 in the env's normalized action space [-1, 1]

Errors are explicit: anything the server refuses (a missing camera, a wrong image shape, NaN in the state) comes back
as ``PolicyServerError`` carrying the gRPC status code and the server's own message, which names the bad key; a server
that cannot be reached raises ``PolicyServerUnavailable`` naming the address.

The server has no RPC that describes its observation spec, so the client cannot check shapes before sending; the
server's INVALID_ARGUMENT message lists the keys and shapes it expects instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gsrl.v1 import rollout_pb2, rollout_pb2_grpc, tensor_pb2
from gsrl.wire_dtypes import NUMPY_BY_DTYPE, encode_numpy

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
    "ActClient",
    "ActResult",
    "ClientTLS",
    "PolicyServerError",
    "PolicyServerUnavailable",
    "build_observation",
    "decode_tensor",
    "encode_tensor",
]

# The policy server's default ``policy_server.max_message_bytes``; both sides must allow the largest observation.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
IMAGE_PREFIX = "rgb/"
STATE_KEY = "state"

_MAX_RESPONSE_RANK = 8


class PolicyServerError(RuntimeError):
    """The policy server refused or failed a call; ``code`` and ``details`` are the gRPC status it sent.

    For INVALID_ARGUMENT the details are the server's validation message, e.g. ``observation 'rgb/3rd_view_camera'
    has shape [1, 16, 16, 3], expected [B, *[32, 32, 3]]``, so the caller can see which key to fix.
    """

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.code = code
        self.details = details


class PolicyServerUnavailable(PolicyServerError):
    """No policy server answered at the address (refused, unresolvable, down, or no answer before the deadline)."""


class TLSSettings(Protocol):
    """What the client reads from a TLS setting: ``ClientTLS`` or the run config's ``gsrl.config.TLSConfig``."""

    @property
    def ca_file(self) -> str: ...

    @property
    def server_name(self) -> str: ...


@dataclass(frozen=True)
class ClientTLS:
    """TLS to a policy server started with ``tls.enabled``: the CA to verify it against ("" = the system roots) and
    the name in its certificate when that differs from the dialled host."""

    ca_file: str = ""
    server_name: str = ""


@dataclass(frozen=True)
class ActResult:
    """One answer of the policy server."""

    # [C, A] float32: C env steps of A-dim actions in the env's normalized action space [-1, 1]; writable.
    action_chunk: np.ndarray
    # Version of the weights that produced the chunk (the learner's update count when it published them).
    policy_version: int
    # The critic's V(observation); useful to log next to the actions, meaningless to the robot.
    value: float
    # Seconds from the start of encoding to the decoded answer: network, queueing in the batcher and inference.
    latency_s: float


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an observation of numpy ``dtype`` travels as: gsrl.env_spec.wire_dtype_name's rule, in numpy.

    Floats go as float32 because every policy reads float32 and the server refuses anything else; robots hand out
    float64 more often than not.
    """
    if dtype.kind == "f":
        return np.dtype("<f4")
    if dtype.kind == "b" or dtype == np.uint8:
        return dtype
    if dtype.kind in "iu":
        return np.dtype("<i8") if dtype.itemsize == 8 else np.dtype("<i4")
    raise TypeError(f"numpy dtype {dtype} cannot be sent as an observation")


def _to_wire(value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(_wire_dtype(array.dtype), copy=False)


def encode_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """numpy array -> ``gsrl.v1.Tensor`` with exactly gsrl.codec.encode's bytes (both use ``encode_numpy``)."""
    return encode_numpy(array)


def decode_tensor(message: tensor_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """``gsrl.v1.Tensor`` -> a writable numpy array in native byte order, checking what the server sent."""
    wire = NUMPY_BY_DTYPE.get(message.dtype)
    if wire is None:
        raise ValueError(f"tensor '{name}': unsupported dtype {message.dtype}")
    shape = list(message.shape)
    if len(shape) > _MAX_RESPONSE_RANK or any(d < 0 for d in shape):
        raise ValueError(f"tensor '{name}': invalid shape {shape}")
    data = message.data
    expected = int(np.prod(shape, dtype=np.int64)) * wire.itemsize
    if len(data) != expected:
        raise ValueError(f"tensor '{name}': shape {shape} needs {expected} bytes, got {len(data)}")
    # bytearray: the caller owns a writable copy (np.clip(..., out=...) on the chunk must work).
    array = np.frombuffer(bytearray(data), dtype=wire).reshape(shape)
    return array if sys.byteorder == "little" else array.astype(wire.newbyteorder("="))


def build_observation(images: Mapping[str, np.ndarray] | None, state: np.ndarray | None) -> dict[str, np.ndarray]:
    """Camera frames and the proprioceptive state -> the server's flat keys ``rgb/<camera>`` and ``state``.

    Frames must be uint8 [H, W, 3] (what GSEnv renders and the image encoder reads); a camera may be named with or
    without the ``rgb/`` prefix. The state is cast to float32, the dtype every policy reads.
    """
    observation: dict[str, np.ndarray] = {}
    for camera, frame in (images or {}).items():
        key = camera if camera.startswith(IMAGE_PREFIX) else f"{IMAGE_PREFIX}{camera}"
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise ValueError(f"image '{key}' has dtype {frame.dtype}; send uint8 [H, W, 3] (0-255)")
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"image '{key}' has shape {list(frame.shape)}; send [H, W, 3] RGB")
        if key in observation:
            raise ValueError(f"image '{key}' given twice (with and without the '{IMAGE_PREFIX}' prefix)")
        observation[key] = frame
    if state is not None:
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise ValueError(f"'{STATE_KEY}' has shape {list(state.shape)}; send a flat vector [D]")
        observation[STATE_KEY] = state
    if not observation:
        raise ValueError("empty observation: pass images and/or state")
    return observation


def _open_channel(address: str, tls: TLSSettings | None, max_message_bytes: int) -> grpc.Channel:
    """Same channel settings as gsrl.tls.open_channel (message limits, round robin over a dns:/// target)."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if address.startswith(("dns:", "ipv4:", "ipv6:")):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if tls is None or not getattr(tls, "enabled", True):  # a run config's TLSConfig may say disabled
        return grpc.insecure_channel(address, options=options)
    root = None
    if tls.ca_file:
        try:
            with open(tls.ca_file, "rb") as f:
                root = f.read()
        except OSError as exc:
            raise ValueError(f"tls.ca_file: cannot read {tls.ca_file}: {exc}") from exc
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


class ActClient:
    """A connection to one policy server (or a ``dns:///`` set of them) for single-observation inference.

    Thread-safe (one gRPC channel); the channel connects lazily on the first call and reconnects by itself, so a
    control loop can keep one client for its lifetime. Use it as a context manager, or call ``close``.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 10.0,
        tls: TLSSettings | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """``timeout_s`` is the deadline of each call: it bounds how long a control loop can be stalled by a server
        that is down or overloaded (the first call also pays for connecting)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        self._channel = _open_channel(address, tls, max_message_bytes)
        self._policy = rollout_pb2_grpc.PolicyServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def act(
        self,
        images: Mapping[str, np.ndarray] | None = None,
        state: np.ndarray | None = None,
        instruction: str = "",
        deterministic: bool = True,
        *,
        observation: Mapping[str, np.ndarray] | None = None,
    ) -> ActResult:
        """One action chunk for one observation.

        Either ``images`` (camera -> uint8 [H, W, 3]) and ``state`` ([D]), or ``observation``, a flat dict already in
        the server's keys (``{"rgb/3rd_view_camera": ..., "state": ...}``; floats are sent as float32). An empty
        ``instruction`` makes the server use its task's own. ``deterministic`` (the default) takes the policy's mean
        action, which is what a robot should execute; ``False`` samples as in training.
        """
        start = time.perf_counter()
        if observation is not None:
            if images is not None or state is not None:
                raise ValueError("pass either images/state or observation, not both")
            observation = {key: _to_wire(value) for key, value in observation.items()}
            if not observation:
                raise ValueError("empty observation")
        else:
            observation = build_observation(images, state)
        request = rollout_pb2.ActRequest(
            observation=tensor_pb2.TensorMap(tensors={key: encode_tensor(value) for key, value in observation.items()}),
            instruction=instruction,
            deterministic=deterministic,
        )
        try:
            response = self._policy.Act(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error("Act", exc) from None
        try:
            action_chunk = decode_tensor(response.action_chunk, "action_chunk")
        except ValueError as exc:
            raise PolicyServerError(
                self.address, f"policy server {self.address} sent a malformed answer: {exc}"
            ) from None
        if action_chunk.ndim != 2:
            raise PolicyServerError(
                self.address, f"policy server {self.address} sent an action chunk of shape {list(action_chunk.shape)}"
            )
        return ActResult(
            action_chunk=action_chunk,
            policy_version=int(response.policy_version),
            value=float(response.value),
            latency_s=time.perf_counter() - start,
        )

    def health(self, service: str = SERVICE_NAME) -> str:
        """The gRPC health status of ``service`` ("SERVING", "NOT_SERVING" while draining, ...).

        Uses the standard grpc.health.v1 service every gsrl server runs, so it is the same answer Kubernetes probes
        get; an unreachable server raises ``PolicyServerUnavailable`` rather than returning a status.
        """
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error("health check", exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Block until the channel is connected (a robot's start-up step), at most ``timeout_s`` (default: the
        client's); raises ``PolicyServerUnavailable`` naming the address otherwise."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise PolicyServerUnavailable(
                self.address, f"cannot connect to the policy server at {self.address} within {timeout:g} s"
            ) from None

    def _error(self, what: str, exc: grpc.RpcError) -> PolicyServerError:
        """A gRPC failure -> an exception whose message says where, what status, and the server's own words."""
        code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
        details: str = (exc.details() if hasattr(exc, "details") else "") or ""
        name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.UNAVAILABLE:
            message = f"cannot reach the policy server at {self.address} ({what}): {details}"
            return PolicyServerUnavailable(self.address, message, code, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = (
                f"no answer from the policy server at {self.address} ({what}) within {self.timeout_s:g} s: it is "
                "unreachable, or slower than timeout_s"
            )
            return PolicyServerUnavailable(self.address, message, code, details)
        message = f"policy server {self.address}: {what} failed with {name}: {details}"
        return PolicyServerError(self.address, message, code, details)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ActClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
