"""Row 4, second half: the tensor codec (numpy -> ``gsrl.v1.Tensor`` -> torch) against a plain copy of the bytes."""

from __future__ import annotations

import numpy as np

from bench.common import Row, Sizes, interleaved, rate
from gsrl import codec
from gsrl.v1 import tensor_pb2


def run(sizes: Sizes) -> list[Row]:
    array = np.random.default_rng(0).standard_normal(sizes.codec_mib << 18).astype(np.float32)  # MiB * 2^20 / 4
    nbytes = array.nbytes
    gb = nbytes / 1e9

    def encode_decode() -> float:
        codec.to_torch(codec.encode(array))
        return gb

    def wire_round_trip() -> float:  # what a gRPC hop adds: serialize on one side, parse on the other
        wire = codec.encode(array).SerializeToString()
        codec.to_torch(tensor_pb2.Tensor.FromString(wire))
        return gb

    def numpy_copy() -> float:
        array.copy()
        return gb

    def bytes_copy() -> float:
        bytes(memoryview(array))
        return gb

    size = f"{sizes.codec_mib} MiB float32"
    t = sizes.min_time_s
    rows = []
    g, b = interleaved(lambda: rate(encode_decode, t), lambda: rate(numpy_copy, t), sizes.repeats)
    rows.append(Row("tensor codec", f"encode+to_torch, {size} (vs numpy copy)", g, b, "GB/s"))
    g, b = interleaved(lambda: rate(wire_round_trip, t), lambda: rate(bytes_copy, t), sizes.repeats)
    rows.append(Row("tensor codec", f"encode+serialize+parse+to_torch, {size} (vs bytes())", g, b, "GB/s"))
    return rows
