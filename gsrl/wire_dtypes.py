"""The wire's dtypes as numpy dtypes, and numpy encoding: what ``gsrl.codec`` and the torch-free ``gsrl.act_client``
share.

Kept free of torch so a robot-side client can encode and decode tensors exactly as the servers do.
"""

from __future__ import annotations

import numpy as np

from gsrl.v1 import tensor_pb2

# bfloat16 has no numpy dtype: it is on the wire only for torch (gsrl.codec).
NUMPY_BY_DTYPE: dict[int, np.dtype] = {
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
DTYPE_BY_NUMPY = {(v.kind, v.itemsize): k for k, v in NUMPY_BY_DTYPE.items()}


def numpy_wire_view(array: np.ndarray) -> tuple[int, np.ndarray]:
    """(wire dtype, the array in its little-endian wire dtype): the input itself unless it was big-endian."""
    array = np.asarray(array)
    dtype = DTYPE_BY_NUMPY.get((array.dtype.kind, array.dtype.itemsize))
    if dtype is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}")
    wire = NUMPY_BY_DTYPE[dtype]
    return dtype, array if array.dtype == wire else array.astype(wire)


def encode_numpy(array: np.ndarray) -> tensor_pb2.Tensor:
    """numpy array -> ``gsrl.v1.Tensor``: little-endian, C order (``tobytes`` copies a strided view into C order)."""
    dtype, array = numpy_wire_view(array)
    return tensor_pb2.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())
