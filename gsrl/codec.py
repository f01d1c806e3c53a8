"""``gsrl.v1.Tensor`` <-> numpy / torch, with strict checks on what comes off the wire.

Tensors cross every network boundary as (dtype, shape, raw little-endian bytes): no pickle, and
decoding never trusts the sender. A malformed message raises ``TensorDecodeError`` naming the
field, which the gRPC servers turn into INVALID_ARGUMENT.

Copies are counted because they are the cost: the protobuf runtime (upb) copies bytes into a message on
construction and out of it on every read of ``data``, so each function here reads ``data`` once and adds at
most one copy of its own (encode: ``tobytes``; ``to_torch``: the private writable array; ``to_numpy``: none).
Trajectory segments are many small tensors, so the per-call Python overhead counts as much as the copies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import numpy as np
import torch

from gsrl.v1 import tensor_pb2
from gsrl.wire_dtypes import NUMPY_BY_DTYPE, encode_numpy

# Refuse absurd sizes before allocating: 2 GiB is far above any observation or segment.
MAX_TENSOR_BYTES = 2 << 30
MAX_RANK = 8
# The wire is little-endian; on such a host torch's and numpy's native bytes are already wire bytes.
_NATIVE_IS_WIRE = sys.byteorder == "little"


class TensorDecodeError(ValueError):
    """A Tensor message is malformed (unknown dtype, bad shape, byte count mismatch, non-finite data)."""


_TORCH_BY_DTYPE: dict[int, torch.dtype] = {
    tensor_pb2.D_TYPE_FLOAT32: torch.float32,
    tensor_pb2.D_TYPE_FLOAT64: torch.float64,
    tensor_pb2.D_TYPE_FLOAT16: torch.float16,
    tensor_pb2.D_TYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.D_TYPE_INT64: torch.int64,
    tensor_pb2.D_TYPE_INT32: torch.int32,
    tensor_pb2.D_TYPE_INT16: torch.int16,
    tensor_pb2.D_TYPE_INT8: torch.int8,
    tensor_pb2.D_TYPE_UINT8: torch.uint8,
    tensor_pb2.D_TYPE_BOOL: torch.bool,
}
_DTYPE_BY_TORCH = {v: k for k, v in _TORCH_BY_DTYPE.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in _TORCH_BY_DTYPE.items()}


def dtype_name(dtype: int) -> str:
    return tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else f"<unknown {dtype}>"


def encode(array: np.ndarray | torch.Tensor) -> tensor_pb2.Tensor:
    """numpy array or torch tensor -> Tensor message (``tobytes`` copies once, protobuf once more)."""
    if isinstance(array, torch.Tensor):
        dtype = _DTYPE_BY_TORCH.get(array.dtype)
        if dtype is None:
            raise TypeError(f"cannot encode torch dtype {array.dtype}")
        tensor = array.detach() if array.requires_grad else array
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        if dtype == tensor_pb2.D_TYPE_BFLOAT16:
            tensor = tensor.view(torch.int16)  # numpy has no bfloat16; the bytes are what travel
        view = tensor.numpy()  # a strided (non-contiguous) view is fine: tobytes writes C order
        if not _NATIVE_IS_WIRE:
            view = view.astype(view.dtype.newbyteorder("<"))
        return tensor_pb2.Tensor(dtype=dtype, shape=view.shape, data=view.tobytes())
    return encode_numpy(array)


def _checked(message: tensor_pb2.Tensor, name: str) -> tuple[int, list[int], bytes]:
    """(dtype, shape, data) of a message that passed every check; ``data`` is read (copied) once, here."""
    dtype = message.dtype
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise TensorDecodeError(f"tensor '{name}': unsupported dtype {dtype_name(dtype)}")
    shape = message.shape[:]  # a list: a slice of the repeated field is about twice as quick as tuple()
    if len(shape) > MAX_RANK:
        raise TensorDecodeError(f"tensor '{name}': rank {len(shape)} exceeds {MAX_RANK}")
    if shape and min(shape) < 0:
        raise TensorDecodeError(f"tensor '{name}': negative dimension in shape {shape}")
    expected = math.prod(shape) * itemsize
    if expected > MAX_TENSOR_BYTES:
        raise TensorDecodeError(f"tensor '{name}': {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    data = message.data
    if len(data) != expected:
        raise TensorDecodeError(
            f"tensor '{name}': shape {shape} of {dtype_name(dtype)} needs {expected} bytes, got {len(data)}"
        )
    return dtype, shape, data


def to_numpy(message: tensor_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Tensor message -> read-only numpy view over one copy of the message bytes. bfloat16 is refused."""
    dtype, shape, data = _checked(message, name)
    if dtype == tensor_pb2.D_TYPE_BFLOAT16:
        raise TensorDecodeError(f"tensor '{name}': bfloat16 has no numpy dtype; decode with to_torch")
    return np.frombuffer(data, dtype=NUMPY_BY_DTYPE[dtype]).reshape(shape)


def to_torch(message: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Tensor message -> a torch tensor that owns its memory (safe to keep and to write)."""
    dtype, shape, data = _checked(message, name)
    if not data:
        return torch.empty(shape, dtype=_TORCH_BY_DTYPE[dtype])
    # bytes are immutable, so the tensor gets a private writable copy, made by numpy: numpy asks the kernel for
    # huge pages on large buffers, so a 64 MiB copy takes about 6 ms where bytearray(data) took 55 ms (4 KiB page
    # faults), and wrapping through numpy costs about half the Python overhead of torch.frombuffer + reshape,
    # which counts for small tensors. bfloat16 travels as int16 bytes (numpy has no bfloat16).
    if dtype == tensor_pb2.D_TYPE_BFLOAT16:
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy().reshape(shape)).view(torch.bfloat16)
    array = np.frombuffer(data, dtype=NUMPY_BY_DTYPE[dtype]).copy()
    if not _NATIVE_IS_WIRE:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def encode_map(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> tensor_pb2.TensorMap:
    # Built in the constructor: CopyFrom into a map entry costs several times more with upb.
    return tensor_pb2.TensorMap(tensors={key: encode(value) for key, value in tensors.items()})


def decode_map_torch(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, torch.Tensor]:
    return {key: to_torch(value, f"{prefix}{key}") for key, value in message.tensors.items()}


def decode_map_numpy(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, np.ndarray]:
    return {key: to_numpy(value, f"{prefix}{key}") for key, value in message.tensors.items()}
