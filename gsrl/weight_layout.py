"""The wire layout of the weight broadcast: which tensors travel, in what order, packed into which buckets.

Pure functions of a state dict's names, shapes and dtypes (no processes, no Redis, no process groups), kept apart
from the group protocol in ``gsrl.weights`` because both ends must compute exactly the same thing independently: the
publisher and every subscriber derive the layout, its hash and the bucket plan on their own, and only the hash and
the bucket sizes travel. Keeping that agreement here lets it be unit tested without a single process group.

Tensors are grouped by dtype into flat buffers of at most ``bucket_bytes`` (one tensor larger than that gets its
own) and sent as bytes, so every dtype in ``WIRE_DTYPES`` works on gloo and NCCL alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Wire codes for dtypes: the position in this tuple. Append only; never reorder.
WIRE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """What must agree between publisher and subscriber for one tensor: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of a single dtype; ``specs`` are laid out back to back in order."""

    dtype: torch.dtype
    specs: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(spec.numel for spec in self.specs)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def tensor_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """Specs sorted by name, so insertion order never changes the wire layout. Meta tensors are fine."""
    layout = tuple(TensorSpec(name, tuple(t.shape), t.dtype) for name, t in sorted(state_dict.items()))
    for spec in layout:
        if spec.dtype not in WIRE_DTYPES:
            raise ValueError(f"tensor {spec.name!r} has dtype {spec.dtype}, which the weight broadcast does not carry")
    return layout


def layout_hash(layout: Sequence[TensorSpec]) -> int:
    """A 63-bit digest of names, shapes and dtypes (fits the int64 header, never negative)."""
    digest = hashlib.sha256()
    for spec in layout:
        digest.update(f"{spec.name}|{','.join(map(str, spec.shape))}|{spec.dtype}\n".encode())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def layout_diff(expected: Sequence[TensorSpec], actual: Sequence[TensorSpec], limit: int = 5) -> str:
    """A short human answer to 'what differs' (names missing or extra, shape or dtype changes)."""
    want, got = {s.name: s for s in expected}, {s.name: s for s in actual}
    lines = [f"missing {n}" for n in sorted(want.keys() - got.keys())]
    lines += [f"unexpected {n}" for n in sorted(got.keys() - want.keys())]
    lines += [
        f"{n}: {got[n].shape}/{got[n].dtype} != {want[n].shape}/{want[n].dtype}"
        for n in sorted(want.keys() & got.keys())
        if want[n] != got[n]
    ]
    return "; ".join(lines[:limit]) + (f" (+{len(lines) - limit} more)" if len(lines) > limit else "")


def plan_buckets(layout: Sequence[TensorSpec], bucket_bytes: int) -> tuple[Bucket, ...]:
    """Group by dtype (in wire-code order), then pack in name order up to ``bucket_bytes`` per bucket.

    Deterministic in (layout, bucket_bytes), so the subscriber rebuilds the same plan from its template and the
    header's ``bucket_bytes``; only the sizes travel (in the descriptor) so a mismatched subscriber can still drain.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    for dtype in WIRE_DTYPES:
        current: list[TensorSpec] = []
        current_bytes = 0
        for spec in (s for s in layout if s.dtype == dtype):
            if current and current_bytes + spec.nbytes > bucket_bytes:
                buckets.append(Bucket(dtype, tuple(current)))
                current, current_bytes = [], 0
            current.append(spec)
            current_bytes += spec.nbytes
        if current:
            buckets.append(Bucket(dtype, tuple(current)))
    return tuple(buckets)


def bucket_descriptor(buckets: Sequence[Bucket]) -> torch.Tensor:
    """``[num_buckets, 2]`` int64 of (wire dtype code, numel): enough to receive without knowing the layout."""
    rows = [[WIRE_DTYPES.index(b.dtype), b.numel] for b in buckets]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)


def flatten_bucket(bucket: Bucket, state_dict: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Copy the bucket's tensors into one new flat buffer on ``device`` (detached; any source device)."""
    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    offset = 0
    for spec in bucket.specs:
        flat[offset : offset + spec.numel].copy_(state_dict[spec.name].detach().reshape(-1))
        offset += spec.numel
    return flat


def unflatten_bucket(bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as the specs; they share ``flat``'s memory, so hand out a fresh ``flat`` each time."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in bucket.specs:
        out[spec.name] = flat[offset : offset + spec.numel].view(spec.shape)
        offset += spec.numel
    return out


def as_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Gloo rejects some dtypes (int16, float8); every backend carries uint8, and a 1-D contiguous view is free."""
    return flat.view(torch.uint8)
