"""``gsrl.v1.Tensor`` <-> numpy / torch, with strict checks on what comes off the wire.

Tensors cross every network boundary as (dtype, shape, raw little-endian bytes): no pickle, and
decoding never trusts the sender. A malformed message raises ``TensorDecodeError`` naming the
field, which the gRPC servers turn into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from gsrl.v1 import tensor_pb2

# Refuse absurd sizes before allocating: 2 GiB is far above any observation or segment.
MAX_TENSOR_BYTES = 2 << 30
MAX_RANK = 8


class TensorDecodeError(ValueError):
    """A Tensor message is malformed (unknown dtype, bad shape, byte count mismatch, non-finite data)."""


_NUMPY_BY_DTYPE: dict[int, np.dtype] = {
    tensor_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.D_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.D_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.D_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.D_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.D_TYPE_INT8: np.dtype("i1"),
    tensor_pb2.D_TYPE_UINT8: np.dtype("u1"),
    tensor_pb2.D_TYPE_BOOL: np.dtype("?"),
}
# Keyed by (kind, itemsize) so big-endian and native arrays map to the same wire dtype.
_DTYPE_BY_NUMPY = {(v.kind, v.itemsize): k for k, v in _NUMPY_BY_DTYPE.items()}
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
    """numpy array or torch tensor -> Tensor message (copies into bytes once)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.dtype not in _DTYPE_BY_TORCH:
            raise TypeError(f"cannot encode torch dtype {tensor.dtype}")
        dtype = _DTYPE_BY_TORCH[tensor.dtype]
        tensor = tensor.to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            data = tensor.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        else:
            data = tensor.numpy().astype(_NUMPY_BY_DTYPE[dtype], copy=False).tobytes()
        return tensor_pb2.Tensor(dtype=dtype, shape=list(tensor.shape), data=data)
    array = np.asarray(array)
    dtype = _DTYPE_BY_NUMPY.get((array.dtype.kind, array.dtype.itemsize))
    if dtype is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=_NUMPY_BY_DTYPE[dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=data)


def _check(message: tensor_pb2.Tensor, name: str) -> None:
    if message.dtype not in _ITEMSIZE:
        raise TensorDecodeError(f"tensor '{name}': unsupported dtype {dtype_name(message.dtype)}")
    shape = list(message.shape)
    if len(shape) > MAX_RANK:
        raise TensorDecodeError(f"tensor '{name}': rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"tensor '{name}': negative dimension in shape {shape}")
    expected = math.prod(shape) * _ITEMSIZE[message.dtype]
    if expected > MAX_TENSOR_BYTES:
        raise TensorDecodeError(f"tensor '{name}': {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"tensor '{name}': shape {shape} of {dtype_name(message.dtype)} needs {expected} bytes, "
            f"got {len(message.data)}"
        )


def to_numpy(message: tensor_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Tensor message -> read-only numpy view over the message bytes (zero-copy). bfloat16 is refused."""
    _check(message, name)
    if message.dtype == tensor_pb2.D_TYPE_BFLOAT16:
        raise TensorDecodeError(f"tensor '{name}': bfloat16 has no numpy dtype; decode with to_torch")
    return np.frombuffer(message.data, dtype=_NUMPY_BY_DTYPE[message.dtype]).reshape(tuple(message.shape))


def to_torch(message: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Tensor message -> a torch tensor that owns its memory (safe to keep and to write)."""
    _check(message, name)
    dtype = _TORCH_BY_DTYPE[message.dtype]
    if not message.data:
        return torch.empty(tuple(message.shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=dtype)
    return flat.reshape(tuple(message.shape))


def encode_map(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> tensor_pb2.TensorMap:
    out = tensor_pb2.TensorMap()
    for key, value in tensors.items():
        out.tensors[key].CopyFrom(encode(value))
    return out


def decode_map_torch(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, torch.Tensor]:
    return {key: to_torch(value, f"{prefix}{key}") for key, value in message.tensors.items()}


def decode_map_numpy(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, np.ndarray]:
    return {key: to_numpy(value, f"{prefix}{key}") for key, value in message.tensors.items()}
