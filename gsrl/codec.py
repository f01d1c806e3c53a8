"""``gsrl.v1.Tensor`` <-> numpy / torch, with strict checks on what comes off the wire.

Tensors cross every network boundary as (dtype, shape, raw little-endian bytes): no pickle, and
decoding never trusts the sender. A malformed message raises ``TensorDecodeError`` naming the
field, which the gRPC servers turn into INVALID_ARGUMENT.

Copies are counted because they are the cost: the protobuf runtime (upb) copies bytes into a message on
construction and out of it on every read of ``data``, so each function here reads ``data`` once and adds at
most one copy of its own (encode: ``tobytes``; ``to_torch``: the private writable array; ``to_numpy``: none).
Trajectory segments are many small tensors, so the per-call Python overhead counts as much as the copies.

The producer side of the trajectory stream does not build messages at all: ``append_tensor_field`` writes the
serialized bytes of a ``Tensor`` field directly (a tag, lengths, the data), which is a third of the Python cost of
constructing a ``Tensor`` and then copying it into its parent message, and copies the data once (into the final
payload) instead of three times (``tobytes``, the constructor, ``SerializeToString``). Parsing stays with upb.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import numpy as np
import torch

from gsrl.v1 import tensor_pb2
from gsrl.wire_dtypes import NUMPY_BY_DTYPE, encode_numpy, numpy_wire_view

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
# ``to_torch`` copies 1-D tensors below this size with bytearray, larger ones with numpy (see there).
_SMALL_BYTES = 64 << 10
# How ``to_torch`` reads each wire dtype's bytes with numpy (bfloat16 as int16, viewed back as bfloat16 after).
_NUMPY_FOR_TORCH = {**NUMPY_BY_DTYPE, tensor_pb2.D_TYPE_BFLOAT16: np.dtype("<i2")}


def dtype_name(dtype: int) -> str:
    return tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else f"<unknown {dtype}>"


def _torch_wire_view(tensor: torch.Tensor) -> tuple[int, np.ndarray]:
    """(wire dtype, a numpy view of the tensor whose bytes in C order are the wire bytes; maybe strided)."""
    dtype = _DTYPE_BY_TORCH.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"cannot encode torch dtype {tensor.dtype}")
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if dtype == tensor_pb2.D_TYPE_BFLOAT16:
        tensor = tensor.view(torch.int16)  # numpy has no bfloat16; the bytes are what travel
    view = tensor.numpy()
    if not _NATIVE_IS_WIRE:
        view = view.astype(view.dtype.newbyteorder("<"))
    return dtype, view


def encode(array: np.ndarray | torch.Tensor) -> tensor_pb2.Tensor:
    """numpy array or torch tensor -> Tensor message (``tobytes`` copies once, protobuf once more)."""
    if isinstance(array, torch.Tensor):
        dtype, view = _torch_wire_view(array)  # a strided (non-contiguous) view is fine: tobytes writes C order
        return tensor_pb2.Tensor(dtype=dtype, shape=view.shape, data=view.tobytes())
    return encode_numpy(array)


# --- Serializing without building messages (the trajectory stream's producer side) --------------------------------
# A Tensor message is: field 1 (dtype, varint), field 2 (shape, packed varints; absent for a scalar), field 3 (data,
# length-delimited; absent when empty, as proto3 writes it). Everything before the data depends only on the dtype,
# the shape and the byte count, so the part that depends on dtype and shape is cached: segments repeat a handful.
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]
_HEADS: dict[tuple[int, tuple[int, ...]], bytes] = {}
_MAX_HEADS = 4096
# Data of this many bytes or more is passed on as a view of the array (copied once, into the payload) instead of
# as ``tobytes`` (copied twice); below it ``tobytes`` is the quicker call.
_VIEW_MIN_BYTES = 16 << 10


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tensor_head(dtype: int, shape: tuple[int, ...]) -> bytes:
    head = _HEADS.get((dtype, shape))
    if head is None:
        packed = b"".join(map(varint, shape))
        head = b"\x08" + varint(dtype) + (b"\x12" + varint(len(packed)) + packed if shape else b"")
        if len(_HEADS) >= _MAX_HEADS:  # shapes that never repeat must not grow this forever
            _HEADS.clear()
        _HEADS[(dtype, shape)] = head
    return head


def append_tensor_field(out: list, tag: bytes, array: np.ndarray | torch.Tensor) -> None:
    """Append to ``out`` the pieces of one length-delimited field ``tag`` holding ``array`` as a ``Tensor``.

    ``b"".join(out)`` then holds what serializing a message with ``encode(array)`` in that field writes; pieces
    may be views of ``array`` (join them before changing it). ``tag`` is ``varint(field_number << 3 | 2)``.
    """
    dtype, view = _torch_wire_view(array) if isinstance(array, torch.Tensor) else numpy_wire_view(array)
    head = _tensor_head(dtype, view.shape)
    nbytes = view.nbytes
    if not nbytes:
        out += (tag, varint(len(head)), head)
        return
    data = memoryview(view).cast("B") if nbytes >= _VIEW_MIN_BYTES and view.flags.c_contiguous else view.tobytes()
    size = varint(nbytes)
    out += (tag, varint(len(head) + 1 + len(size) + nbytes), head, b"\x1a", size, data)


def append_tensor_map_field(out: list, tag: bytes, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """``append_tensor_field`` for a ``TensorMap`` field: one map entry (key 1, value 2) per tensor.

    An empty map is written as an empty message, as setting the field to ``encode_map({})`` does.
    """
    entries: list = []
    for key, value in tensors.items():
        name = key.encode()
        value_pieces: list = []
        append_tensor_field(value_pieces, b"\x12", value)
        key_size = varint(len(name))
        entry_size = 1 + len(key_size) + len(name) + sum(map(len, value_pieces))
        entries += (b"\x0a", varint(entry_size), b"\x0a", key_size, name, *value_pieces)
    out += (tag, varint(sum(map(len, entries))), *entries)


def _checked(message: tensor_pb2.Tensor, name: str) -> tuple[int, list[int], bytes]:
    """(dtype, shape, data) of a message that passed every check; ``data`` is read (copied) once, here."""
    dtype = message.dtype
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise TensorDecodeError(f"tensor '{name}': unsupported dtype {dtype_name(dtype)}")
    shape = message.shape[:]  # a list: a slice of the repeated field is about twice as quick as tuple()
    if len(shape) == 1:  # most tensors of a trajectory segment: no min() and prod() (negative if the dim is)
        expected = shape[0] * itemsize
    elif len(shape) > MAX_RANK:
        raise TensorDecodeError(f"tensor '{name}': rank {len(shape)} exceeds {MAX_RANK}")
    elif shape and min(shape) < 0:
        expected = -1
    else:
        expected = math.prod(shape) * itemsize
    if expected < 0:
        raise TensorDecodeError(f"tensor '{name}': negative dimension in shape {shape}")
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
    # bytes are immutable, so the tensor gets a private writable copy. A small 1-D tensor (most of a trajectory
    # segment's: rewards, values, ...) is one bytearray copy wrapped by torch.frombuffer, the quickest pair of calls
    # (0.6 us against 0.8 through numpy). Anything else is copied by numpy: numpy asks the kernel for huge pages on
    # large buffers, so a 64 MiB copy takes about 6 ms where bytearray(data) took 55 ms (4 KiB page faults), and
    # its reshape costs a seventh of a torch view. bfloat16 goes through numpy as int16 bytes and is viewed back.
    if len(shape) == 1 and 0 < len(data) < _SMALL_BYTES and _NATIVE_IS_WIRE:
        return torch.frombuffer(bytearray(data), dtype=_TORCH_BY_DTYPE[dtype])
    array = np.frombuffer(data, dtype=_NUMPY_FOR_TORCH[dtype]).copy()
    if not _NATIVE_IS_WIRE:
        array = array.astype(array.dtype.newbyteorder("="))
    if len(shape) != 1:
        array = array.reshape(shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == tensor_pb2.D_TYPE_BFLOAT16 else tensor


def encode_map(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> tensor_pb2.TensorMap:
    # Built in the constructor: CopyFrom into a map entry costs several times more with upb.
    return tensor_pb2.TensorMap(tensors={key: encode(value) for key, value in tensors.items()})


def decode_map_torch(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, torch.Tensor]:
    return {key: to_torch(value, f"{prefix}{key}") for key, value in message.tensors.items()}


def decode_map_numpy(message: tensor_pb2.TensorMap, prefix: str = "") -> dict[str, np.ndarray]:
    return {key: to_numpy(value, f"{prefix}{key}") for key, value in message.tensors.items()}
