"""Tensor codec: round trips for every dtype, and malformed messages are refused with the field named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsrl import codec
from gsrl.v1 import tensor_pb2

NUMPY_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    message = codec.encode(array)
    assert list(message.shape) == [2, 3, 4]
    decoded = codec.to_numpy(message)
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(codec.to_torch(message).numpy(), array)


def test_torch_bfloat16_and_non_contiguous() -> None:
    tensor = torch.randn(4, 6).t()  # non-contiguous view
    assert torch.equal(codec.to_torch(codec.encode(tensor)), tensor)
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    assert torch.equal(codec.to_torch(codec.encode(bf16)), bf16)
    with pytest.raises(codec.TensorDecodeError, match="bfloat16"):
        codec.to_numpy(codec.encode(bf16))


def test_big_endian_input_is_encoded_little_endian() -> None:
    array = np.arange(5, dtype=">i4")
    np.testing.assert_array_equal(codec.to_numpy(codec.encode(array)), array)


def test_decoded_torch_tensor_is_writable_and_owned() -> None:
    message = codec.encode(np.zeros(3, np.float32))
    tensor = codec.to_torch(message)
    tensor += 1
    assert codec.to_numpy(message).sum() == 0


def test_empty_and_scalar() -> None:
    assert codec.to_torch(codec.encode(np.zeros((0, 3), np.float32))).shape == (0, 3)
    assert codec.to_numpy(codec.encode(np.float32(2.5))).item() == 2.5


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.D_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12), "needs 16 bytes, got 12"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.D_TYPE_UNSPECIFIED, shape=[1], data=b"\0"), "unsupported dtype"),
        (tensor_pb2.Tensor(dtype=77, shape=[1], data=b"\0"), "unsupported dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.D_TYPE_UINT8, shape=[-1, 4], data=b""), "negative dimension"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.D_TYPE_UINT8, shape=[1] * 9, data=b"\0"), "rank 9"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.D_TYPE_FLOAT64, shape=[1 << 20, 1 << 20], data=b""), "limit"),
    ],
)
def test_malformed_tensors_are_refused(message: tensor_pb2.Tensor, fragment: str) -> None:
    with pytest.raises(codec.TensorDecodeError, match=fragment) as err:
        codec.to_torch(message, "observations/state")
    assert "observations/state" in str(err.value)
    with pytest.raises(codec.TensorDecodeError):
        codec.to_numpy(message)


def test_unsupported_source_dtype() -> None:
    with pytest.raises(TypeError, match="complex"):
        codec.encode(np.zeros(2, np.complex64))


WIRE_CASES = [
    *[(np.arange(24).reshape(2, 3, 4) % 7).astype(d) for d in NUMPY_DTYPES],
    np.arange(5, dtype=">i4"),  # big-endian input
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),  # not C-contiguous
    (np.arange(40000) % 251).astype(np.uint8).reshape(200, 200),  # large: passed on as a view, not copied
    np.float32(2.5),  # scalar: no shape field
    np.zeros((0, 3), np.float32),  # empty: no data field
    torch.randn(300, 100).t(),  # non-contiguous and large
    torch.randn(200, 100).to(torch.bfloat16),
    torch.randn(5, requires_grad=True),
    torch.tensor([True, False, True]),
]


@pytest.mark.parametrize("array", WIRE_CASES, ids=lambda a: f"{type(a).__name__}-{a.dtype}-{list(a.shape)}")
def test_append_tensor_field_writes_what_protobuf_serializes(array: np.ndarray | torch.Tensor) -> None:
    """The hand-written field parses to exactly ``encode(array)``, and is as long as protobuf's own bytes."""
    from gsrl.v1 import trajectory_pb2  # any message with a Tensor field: action_chunks is field 6

    pieces: list = []
    codec.append_tensor_field(pieces, codec.varint(6 << 3 | 2), array)
    written = b"".join(pieces)
    expected = trajectory_pb2.TrajectorySegment(action_chunks=codec.encode(array))
    assert trajectory_pb2.TrajectorySegment.FromString(written) == expected
    assert len(written) == len(expected.SerializeToString())


def test_append_tensor_map_field_writes_what_protobuf_serializes() -> None:
    from gsrl.v1 import trajectory_pb2  # observations: field 4

    tensors = {"state": np.ones((4, 5), np.float32), "rgb": np.zeros((4, 3, 64, 64), np.uint8), "é": np.zeros(0)}
    pieces: list = []
    codec.append_tensor_map_field(pieces, codec.varint(4 << 3 | 2), tensors)
    expected = trajectory_pb2.TrajectorySegment(observations=codec.encode_map(tensors))
    assert trajectory_pb2.TrajectorySegment.FromString(b"".join(pieces)) == expected


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (16384, b"\x80\x80\x01")],
)
def test_varint(value: int, wire: bytes) -> None:
    assert codec.varint(value) == wire


def test_small_one_dimensional_tensors_are_writable_and_owned() -> None:
    message = codec.encode(torch.arange(4, dtype=torch.float32))  # the bytearray path of to_torch
    first, second = codec.to_torch(message), codec.to_torch(message)
    first += 1
    assert torch.equal(second, torch.arange(4, dtype=torch.float32)) and first.dtype == torch.float32
