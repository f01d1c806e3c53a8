"""The wire layout of the weight broadcast: which tensors travel, in what order, packed into which buckets.

Pure functions of a state dict's names, shapes and dtypes (no processes, no Redis, no process groups), kept apart
from the group protocol in ``gsrl.weights`` because both ends must compute exactly the same thing independently: the
publisher and every subscriber derive the layout, its hash and the bucket plan on their own, and only the hash and
the bucket sizes travel. Keeping that agreement here lets it be unit tested without a single process group.

Tensors are grouped by dtype into flat buffers of at most ``bucket_bytes`` (one tensor larger than that gets its
own) and sent as bytes, so every dtype in ``WIRE_DTYPES`` works on gloo and NCCL alike.

``BucketBuffers``/``BufferPool`` keep those flat buffers between versions: a fresh 64 MiB buffer costs about as much
in page faults (CPU) or allocator work as the transfer itself, so both ends allocate once per plan and reuse a set
only once nobody holds a tensor of it any more (the storage's use count says so), which makes reuse invisible to a
consumer that keeps the tensors it was given.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Wire codes for dtypes: the position in this tuple. Append only; never reorder.
WIRE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)  # fmt: skip


# One broadcast carries at most this much of a bucket (see ``piece_ranges``): small enough that the publisher's copy of
# the first piece (about 1 ms per 16 MiB on a CPU) barely delays the transfer, large enough that the per-collective
# latency stays small against the bytes.
WIRE_PIECE_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What must agree between publisher and subscriber for one tensor: name, shape and dtype.

    Sizes are cached (outside the compared fields): both ends read every bucket's size on every message, and summing
    a thousand specs each time cost a fraction of a millisecond before the first byte moved.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @cached_property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @cached_property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of a single dtype; ``specs`` are laid out back to back in order (sizes cached, as above)."""

    dtype: torch.dtype
    specs: tuple[TensorSpec, ...]

    @cached_property
    def numel(self) -> int:
        return sum(spec.numel for spec in self.specs)

    @cached_property
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


def piece_ranges(numel: int, itemsize: int, piece_bytes: int) -> list[tuple[int, int]]:
    """Element ranges ``[start, stop)`` in which one bucket travels: one broadcast each, at most ``piece_bytes``.

    Pieces let the publisher copy the next part of a bucket while the previous one is on the wire, so only the first
    piece's copy adds to the delivery time. ``piece_bytes <= 0``: the whole bucket at once. An empty bucket still
    travels as one empty piece, so both ends count the same broadcasts.
    """
    if piece_bytes <= 0 or numel == 0:
        return [(0, numel)]
    step = max(1, piece_bytes // itemsize)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def bucket_descriptor(buckets: Sequence[Bucket]) -> torch.Tensor:
    """``[num_buckets, 2]`` int64 of (wire dtype code, numel): enough to receive without knowing the layout."""
    rows = [[WIRE_DTYPES.index(b.dtype), b.numel] for b in buckets]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)


def flatten_bucket(bucket: Bucket, state_dict: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Copy the bucket's tensors into one new flat buffer on ``device`` (detached; any source device)."""
    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    offset = 0
    for spec in bucket.specs:
        if spec.numel:
            _copy_into(flat[offset : offset + spec.numel], state_dict[spec.name].detach(), spec.shape)
        offset += spec.numel
    return flat


def unflatten_bucket(bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as the specs; they share ``flat``'s memory, so hand out a fresh ``flat`` each time.

    One ``split`` makes all the flat views in C++ (a Python slice per spec was half the cost for a thousand specs).
    """
    pieces = flat.split([spec.numel for spec in bucket.specs])
    return {spec.name: piece.view(spec.shape) for spec, piece in zip(bucket.specs, pieces, strict=True)}


def as_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Gloo rejects some dtypes (int16, float8); every backend carries uint8, and a 1-D contiguous view is free."""
    return flat.view(torch.uint8)


def _storage_use_count(tensor: torch.Tensor) -> int | None:
    """How many tensors (and storage handles) share ``tensor``'s storage; None where this torch cannot say.

    A private torch function, hence the guard: without it a buffer set always counts as busy, which is correct (a
    fresh set per version, the behaviour before pooling) and only slower.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(tensor.untyped_storage()._cdata))


def _copy_into(dst: torch.Tensor, src: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Copy ``src`` into the flat slice ``dst``: one plain memcpy for a contiguous CPU tensor of the same dtype.

    ``Tensor.copy_`` splits a large CPU copy over torch's intra-op threads; on a host whose cores are busy (the
    learner's, or this 2-core box with other jobs) one of those threads waits for a time slice and a 60 MiB copy took
    120 ms instead of 3. A memcpy is bandwidth-bound on one core anyway, so contiguous CPU sources go through numpy
    (which releases the GIL for it); anything else (other device, strides, dtype) through ``copy_``.
    """
    if src.device.type == "cpu" and dst.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
        np.copyto(dst.view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        dst.view(shape).copy_(src)


class BucketBuffers:
    """One flat buffer per bucket of a plan on one device, allocated once and touched (zeroed) at allocation.

    Zeroing up front moves the page faults of a fresh CPU buffer out of the transfer: the first version pays them,
    every later one writes into memory that is already mapped. ``flats`` are owned by this object; whoever gets
    ``tensors()`` or ``views()`` holds views, and while any view is alive the set reports ``busy``.

    On a GPU each ``copy_`` is a kernel launch that costs microseconds of CPU, so the copies of a thousand tensors can
    take longer to launch than their bytes take to cross NVLink; there ``fill`` copies a range of specs with one
    ``_foreach_copy_`` into views of the buffer shaped as the specs, made here once (counted in the idle use count).
    """

    def __init__(self, buckets: Sequence[Bucket], device: torch.device) -> None:
        self.buckets = tuple(buckets)
        self.device = torch.device(device)
        self.flats = tuple(torch.zeros(b.numel, dtype=b.dtype, device=self.device) for b in self.buckets)
        # Per bucket, where each spec starts in its buffer (plus the end): filling stops at piece boundaries.
        self.offsets = tuple(
            tuple(itertools.accumulate((spec.numel for spec in b.specs), initial=0)) for b in self.buckets
        )
        self._targets = (
            tuple(tuple(unflatten_bucket(b, flat).values()) for b, flat in zip(self.buckets, self.flats, strict=True))
            if self.device.type == "cuda"
            else None
        )
        self._idle_counts = tuple(_storage_use_count(flat) for flat in self.flats)

    @property
    def busy(self) -> bool:
        """True while anyone else holds a view of any buffer (or when torch cannot tell)."""
        for flat, idle in zip(self.flats, self._idle_counts, strict=True):
            count = _storage_use_count(flat)
            if count is None or idle is None or count != idle:
                return True
        return False

    def fill(
        self, index: int, state_dict: Mapping[str, torch.Tensor], first: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Copy specs ``first:stop`` of bucket ``index`` from ``state_dict`` (any device, any strides) into its buffer.

        Returns the buffer. The whole bucket by default; the publisher fills it spec by spec ahead of each piece.
        """
        bucket, flat, offsets = self.buckets[index], self.flats[index], self.offsets[index]
        positions = range(first, len(bucket.specs) if stop is None else stop)
        if self._targets is not None:
            targets = self._targets[index]
            chosen = [position for position in positions if bucket.specs[position].numel]
            if chosen:
                with torch.no_grad():  # sources may require grad; the buffers never do
                    torch._foreach_copy_(  # falls back to one copy_ each where it cannot fuse (other device, strides)
                        [targets[position] for position in chosen],
                        [state_dict[bucket.specs[position].name] for position in chosen],
                    )
            return flat
        for position in positions:
            spec, offset = bucket.specs[position], offsets[position]
            if spec.numel:
                _copy_into(flat[offset : offset + spec.numel], state_dict[spec.name].detach(), spec.shape)
        return flat

    def tensors(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of the plan as a view of its buffer (keeps the set busy while held).

        With another ``device``: views of one copy of each buffer there, one transfer per bucket rather than one per
        tensor, and the set is free again as soon as this returns.
        """
        out: dict[str, torch.Tensor] = {}
        moved = device is not None and torch.device(device) != self.device
        for bucket, flat in zip(self.buckets, self.flats, strict=True):
            out.update(unflatten_bucket(bucket, flat.to(device) if moved else flat))
        return out

    def views(self) -> list[tuple[Bucket, torch.Tensor]]:
        """Each bucket with a view of its whole buffer (keeps the set busy while held): for the snapshot writer."""
        return [(bucket, flat.view(-1)) for bucket, flat in zip(self.buckets, self.flats, strict=True)]


class BufferPool:
    """Up to ``max_sets`` ``BucketBuffers`` for the current plan; a new plan (layout or bucket size) drops them all.

    ``acquire`` hands out a set that nobody else holds a view of; when all are held it makes a new one (kept if the
    pool has room, else used once), so a consumer that keeps old tensors never sees them overwritten.
    """

    def __init__(self, max_sets: int) -> None:
        if max_sets < 1:
            raise ValueError(f"max_sets must be >= 1, got {max_sets}")
        self.max_sets = max_sets
        self._key: tuple[tuple[Bucket, ...], torch.device] | None = None
        self._sets: list[BucketBuffers] = []
        self.allocations = 0  # sets ever allocated: what the reuse saves shows here (tests, debugging)

    def acquire(self, buckets: Sequence[Bucket], device: torch.device) -> BucketBuffers:
        key = (tuple(buckets), torch.device(device))
        if key != self._key:
            self._key, self._sets = key, []
        for buffers in self._sets:
            if not buffers.busy:
                return buffers
        buffers = BucketBuffers(key[0], key[1])
        self.allocations += 1
        if len(self._sets) < self.max_sets:
            self._sets.append(buffers)
        else:
            logger.debug("weight buffers: all %d sets held; using a one-off set", self.max_sets)
        return buffers
