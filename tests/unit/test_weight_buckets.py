"""Bucketing, layout hashing, persistent buffers and snapshot bytes for the weight broadcast: no processes."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from gsrl.weight_layout import (
    WIRE_DTYPES,
    BucketBuffers,
    BufferPool,
    bucket_descriptor,
    flatten_bucket,
    layout_hash,
    piece_ranges,
    plan_buckets,
    tensor_layout,
    unflatten_bucket,
)
from gsrl.weight_snapshot import encode_snapshot, snapshot_nbytes


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "encoder.weight": torch.randn(40, 30),  # 4800 B: larger than a 4 KiB bucket on its own
        "encoder.bias": torch.randn(30),
        "head.weight": torch.randn(6, 30).t(),  # non-contiguous source
        "step": torch.tensor([7], dtype=torch.int64),
        "counts": torch.arange(50, dtype=torch.int16),
        "scale": torch.randn(5).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
    }


def round_trip(sd: dict[str, torch.Tensor], bucket_bytes: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for bucket in plan_buckets(tensor_layout(sd), bucket_bytes):
        flat = flatten_bucket(bucket, sd, torch.device("cpu"))
        assert flat.dtype == bucket.dtype and flat.numel() == bucket.numel
        out.update(unflatten_bucket(bucket, flat.clone()))
    return out


@pytest.mark.parametrize("bucket_bytes", [1, 512, 4096, 1 << 20])
def test_flatten_unflatten_round_trip(bucket_bytes: int) -> None:
    sd = state()
    out = round_trip(sd, bucket_bytes)
    assert out.keys() == sd.keys()
    for name, tensor in sd.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(out[name], tensor), name


def test_buckets_hold_one_dtype_and_respect_the_byte_bound() -> None:
    layout = tensor_layout(state())
    buckets = plan_buckets(layout, 4096)
    assert sorted(s.name for b in buckets for s in b.specs) == sorted(s.name for s in layout)
    for bucket in buckets:
        assert all(spec.dtype == bucket.dtype for spec in bucket.specs)
        assert bucket.nbytes <= 4096 or len(bucket.specs) == 1  # only a lone oversized tensor may exceed it
    float_buckets = [[s.name for s in b.specs] for b in buckets if b.dtype == torch.float32]
    # name order, greedy: the oversized encoder.weight closes the first bucket and sits alone
    assert float_buckets == [["empty", "encoder.bias"], ["encoder.weight"], ["head.weight"]]
    assert len(plan_buckets(layout, 1 << 20)) == len({s.dtype for s in layout})


def test_descriptor_lists_wire_dtype_and_size() -> None:
    buckets = plan_buckets(tensor_layout(state()), 4096)
    rows = bucket_descriptor(buckets).tolist()
    assert [(WIRE_DTYPES[code], numel) for code, numel in rows] == [(b.dtype, b.numel) for b in buckets]
    assert bucket_descriptor(()).shape == (0, 2)


def test_unflattened_tensors_are_views_of_the_given_buffer_only() -> None:
    sd = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    (bucket,) = plan_buckets(tensor_layout(sd), 1 << 10)
    flat = flatten_bucket(bucket, sd, torch.device("cpu"))
    sd["a"].fill_(5)  # the source may change after flattening (the learner keeps training)
    out = unflatten_bucket(bucket, flat)
    assert torch.equal(out["a"], torch.ones(2, 2)) and out["a"].is_contiguous()


def test_layout_hash_changes_with_shape_dtype_or_name_but_not_order_or_values() -> None:
    sd = state()
    base = layout_hash(tensor_layout(sd))
    assert layout_hash(tensor_layout(dict(reversed(list(sd.items()))))) == base
    assert layout_hash(tensor_layout({k: torch.zeros_like(v) for k, v in sd.items()})) == base
    assert layout_hash(tensor_layout({k: v.to("meta") for k, v in sd.items()})) == base  # a meta template works
    assert layout_hash(tensor_layout({**sd, "encoder.weight": torch.randn(30, 40)})) != base  # same numel
    assert layout_hash(tensor_layout({**sd, "step": torch.tensor([7], dtype=torch.int32)})) != base
    renamed = {("decoder.bias" if k == "encoder.bias" else k): v for k, v in sd.items()}
    assert layout_hash(tensor_layout(renamed)) != base
    assert 0 <= base < 2**63


def test_unsupported_dtype_and_bad_bucket_size_are_refused() -> None:
    with pytest.raises(ValueError, match="complex"):
        tensor_layout({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(tensor_layout(state()), 0)


# ---------------------------------------------------------------- persistent buffers


def test_pool_reuses_a_set_only_while_nobody_holds_its_tensors() -> None:
    sd = state()
    buckets = plan_buckets(tensor_layout(sd), 4096)
    pool = BufferPool(max_sets=2)
    first = pool.acquire(buckets, torch.device("cpu"))
    assert pool.acquire(buckets, torch.device("cpu")) is first and pool.allocations == 1  # nothing held: reused
    for index in range(len(buckets)):
        first.fill(index, sd)
    held = first.tensors()  # a consumer keeps version 1 (PolicyHost parks it until its next batch)
    second = pool.acquire(buckets, torch.device("cpu"))
    assert second is not first and first.busy and pool.allocations == 2
    for index in range(len(buckets)):
        second.fill(index, {k: torch.zeros_like(v) for k, v in sd.items()})
    assert all(torch.equal(held[k], v) for k, v in sd.items())  # version 2 did not touch what the consumer holds
    snapshot_views = second.views()
    one_off = pool.acquire(buckets, torch.device("cpu"))  # both held, pool full: a set used once
    assert one_off not in (first, second) and pool.allocations == 3
    del held, snapshot_views
    assert not first.busy and pool.acquire(buckets, torch.device("cpu")) is first


def test_a_new_plan_reallocates() -> None:
    sd = state()
    pool = BufferPool(max_sets=3)
    old = pool.acquire(plan_buckets(tensor_layout(sd), 4096), torch.device("cpu"))
    assert pool.acquire(plan_buckets(tensor_layout(sd), 4096), torch.device("cpu")) is old
    grown = {**sd, "encoder.bias": torch.randn(31)}  # a layout change
    new = pool.acquire(plan_buckets(tensor_layout(grown), 4096), torch.device("cpu"))
    assert new is not old and pool.allocations == 2
    assert [f.numel() for f in new.flats] == [b.numel for b in plan_buckets(tensor_layout(grown), 4096)]
    rebucketed = pool.acquire(plan_buckets(tensor_layout(grown), 1 << 20), torch.device("cpu"))  # a new bucket size
    assert rebucketed is not new and pool.allocations == 3


def test_partial_fills_cover_exactly_the_specs_asked_for() -> None:
    sd = {"a": torch.full((3,), 1.0), "b": torch.full((2, 2), 2.0).t(), "c": torch.full((5,), 3.0)}
    (bucket,) = plan_buckets(tensor_layout(sd), 1 << 10)
    buffers = BucketBuffers((bucket,), torch.device("cpu"))
    assert buffers.offsets == ((0, 3, 7, 12),)
    buffers.fill(0, sd, 0, 1)
    assert buffers.flats[0].tolist() == [1.0] * 3 + [0.0] * 9
    buffers.fill(0, sd, 1)
    assert buffers.flats[0].tolist() == [1.0] * 3 + [2.0] * 4 + [3.0] * 5


def test_piece_ranges_cover_a_bucket_in_bounded_pieces() -> None:
    assert piece_ranges(10, 4, 0) == [(0, 10)]
    assert piece_ranges(10, 4, 16) == [(0, 4), (4, 8), (8, 10)]
    assert piece_ranges(10, 4, 18) == [(0, 4), (4, 8), (8, 10)]  # whole elements only
    assert piece_ranges(3, 8, 1) == [(0, 1), (1, 2), (2, 3)]  # never an empty piece for a positive size
    assert piece_ranges(0, 4, 16) == [(0, 0)]  # an empty bucket still travels once


def test_snapshot_bytes_are_safetensors_for_every_wire_dtype() -> None:
    sd = {f"t{i}": torch.arange(7, dtype=torch.float32).to(dtype) for i, dtype in enumerate(WIRE_DTYPES)}
    sd["matrix"] = torch.randn(3, 5)
    buckets = plan_buckets(tensor_layout(sd), 4096)
    flats = [(b, flatten_bucket(b, sd, torch.device("cpu"))) for b in buckets]
    pieces = encode_snapshot(flats, version=7, chunk_bytes=16)
    assert all(len(piece) <= 16 for piece in pieces[1:]) and len(pieces) > len(buckets)
    blob = b"".join(bytes(piece) for piece in pieces)
    assert len(blob) == snapshot_nbytes(buckets, 7)
    loaded = safetensors.torch.load(blob)
    assert loaded.keys() == sd.keys()
    for name, tensor in sd.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(
            loaded[name].view(torch.uint8), tensor.view(torch.uint8)
        )
