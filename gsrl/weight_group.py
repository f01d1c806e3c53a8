"""The weight broadcast's group protocol: what publisher and subscriber must agree on to share a process group.

Kept apart from ``gsrl.weights`` (the two ends, ``WeightPublisher`` and ``WeightSubscriber``) because both ends
build, use and tear down the same group and read the same control keys; putting that here gives them one definition
of the wire header, the Redis/store key names, the backend checks and the process-group construction, so the two
ends cannot drift apart. What the bytes look like lives in ``gsrl.weight_layout``; the Redis snapshot in
``gsrl.weight_snapshot``.

The broadcast group is not DeepSpeed's world: the publisher (learner rank 0) hosts its own ``TCPStore`` and builds a
``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU) directly over a ``PrefixStore`` that names the group
generation, as veRL, OpenRLHF and vLLM do for weight sync; ``init_process_group`` is never called, so the learner's
default group is untouched. Rank 0 is the publisher, ranks 1..N are the policy servers in sorted id order.

Redis holds the control state (keys under ``{key_prefix}:weights:``):

- ``subscribers``: sorted set ``{id}@{incarnation}`` -> last heartbeat (Redis server clock, so pod clocks never
  matter). The incarnation (random per ``start``) makes a restart under the same id, a pod name say, a membership
  change, so the group is rebuilt instead of broadcasting to a rank whose process is gone.
- ``generation``: counter; ``group``: JSON of the current generation {generation, host, port, members, backend}.
- ``announce``: ``"{generation}:{messages sent}"``. A subscriber posts a receive only for an announced message. Gloo
  cannot cancel a posted receive (``abort``/``shutdown``/``del`` all wait for it to time out), so a subscriber that
  sat in a receive between publishes could neither stop promptly nor notice that its group was replaced.
- ``wake``: a pub/sub channel the publisher posts to right after changing ``announce``, so a subscriber waiting
  between publishes reads it at once instead of at its next poll (a 20 ms poll was a fifth of a 64 MiB delivery).
  Only a hint: the key stays the truth, and a subscriber that missed the message sees the key at its next poll.
- ``version``, ``snapshot:meta`` + ``snapshot:{version}:{i}``: the latest weights (see ``gsrl.weight_snapshot``).
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import redis
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

HEADER_MAGIC = 0x6773726C  # "gsrl"
# magic, generation, sequence, version, num_buckets, layout_hash, piece_bytes, bucket_bytes. piece_bytes was a
# reserved 0 before buckets travelled in pieces, and 0 still means "each bucket in one broadcast".
HEADER_LEN = 8
_POLL_S = 0.02
# Longest sleep between two checks of a NCCL work in ``_wait``; shorter while the wait is young (see there).
_WORK_POLL_MAX_S = 1e-3


# ---------------------------------------------------------------- Redis keys


class _Keys:
    def __init__(self, key_prefix: str) -> None:
        base = f"{key_prefix}:weights"
        self.subscribers = f"{base}:subscribers"
        self.generation = f"{base}:generation"
        self.group = f"{base}:group"
        self.announce = f"{base}:announce"
        self.wake = f"{base}:wake"
        self.store_prefix = f"{key_prefix}/weights/gen{{generation}}/"


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


# ---------------------------------------------------------------- process groups


@dataclass
class _Group:
    generation: int
    members: tuple[str, ...]
    pg: dist.ProcessGroup
    store: dist.Store  # held for the group's lifetime
    device: torch.device  # where this backend's buffers live (the wire device)
    sent: int = 0  # messages announced in this generation
    broken: bool = False

    def close(self) -> None:
        """``abort`` after a failure, and always for NCCL; ``shutdown`` for a healthy gloo group.

        NCCL's ``shutdown`` finalizes the communicator, which waits on the other ranks; the peers of a weight group
        leave on their own schedules (a learner stops while its policy servers keep serving), so a learner that
        shut its NCCL group down hung at exit (seen on 2 x H100). Every broadcast has completed by then (each is
        waited on), so ``abort``, which only frees this rank's side, loses nothing.
        """
        error = close_process_group(self.pg, abort=self.broken or self.device.type == "cuda")
        if error is not None:
            logger.debug("closing weight group %d: %s", self.generation, error)


def close_process_group(pg: dist.ProcessGroup, *, abort: bool) -> Exception | None:
    """Tears ``pg`` down: ``abort`` frees only this rank's side and waits on nobody (what an NCCL group needs when
    its peers leave on their own schedules), ``shutdown`` finalizes it with the others. Returns the error the
    teardown raised, if any, for the caller to report: teardown after a failure may fail in many ways."""
    try:
        if abort:
            pg.abort()
        else:
            pg.shutdown()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return exc
    return None


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _new_process_group(
    backend: str, store: dist.Store, rank: int, size: int, timeout_s: float, gloo_hostname: str | None
) -> dist.ProcessGroup:
    """Construct the backend directly (no ``init_process_group``: the learner already has DeepSpeed's world).

    The backend's own keys go under ``pg/`` in ``store``, apart from the join handshake (``joined/*``, ``commit``).
    """
    store = dist.PrefixStore("pg/", store)
    timeout = _timedelta(timeout_s)
    if backend == "gloo":
        if gloo_hostname is None:  # default device: GLOO_SOCKET_IFNAME, else the address of this host's name
            return dist.ProcessGroupGloo(store, rank, size, timeout)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=gloo_hostname)]
        return dist.ProcessGroupGloo(store, rank, size, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.is_high_priority_stream = False
    return dist.ProcessGroupNCCL(store, rank, size, options)


def _broadcast_start(pg: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float) -> dist.Work:
    """Start a broadcast from rank 0 without waiting: the publisher fills the next bucket while this one travels."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    options.timeout = _timedelta(timeout_s)
    return pg.broadcast([tensor], options)


def _broadcast(pg: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float) -> None:
    """Broadcast from rank 0 and block the CPU until done (see ``_wait``)."""
    _wait(_broadcast_start(pg, tensor, timeout_s), timeout_s, tensor.device)


def _wait(work: dist.Work, timeout_s: float, device: torch.device) -> None:
    """Block the CPU until ``work`` is done; raise if it failed or ``timeout_s`` passed first.

    Not ``work.wait(timeout)`` for NCCL: with a timeout, ``WorkNCCL::wait`` checks for completion and then sleeps
    ``kSynchronizeBusyWaitMillis`` (1 ms) between checks, so every blocking collective costs at least a millisecond
    however small. Publishing 1 GiB took 71 of them on each end (69 pieces of 16 MiB, header, descriptor), which is
    the 76 ms that it took on 2 x H200 where one flat broadcast of it takes 3.5 ms. Here the sleep grows with the
    time already waited (1/32 of it, at most ``_WORK_POLL_MAX_S``), so a short transfer is seen done within tens of
    microseconds and a long one is overshot by about 3%. Then a plain ``wait()`` orders this thread's current stream
    after the work, lets NCCL drop the tensors it stashed, and raises the work's error if it has one (``is_completed``
    is also true for a failed work). Gloo's ``wait`` sleeps on a condition variable that the work signals, so gloo
    works keep it.
    """
    if not _stream_ordered(device):
        work.wait(_timedelta(timeout_s))
        return
    started = time.monotonic()
    while not work.is_completed():
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise TimeoutError(f"NCCL work not done after {timeout_s:.1f} s")
        time.sleep(min(waited / 32, _WORK_POLL_MAX_S))
    work.wait()


def _stream_ordered(wire: torch.device) -> bool:
    """Whether collectives on ``wire`` run in the order posted, each after what this thread had queued on the device
    before posting it (NCCL, on a GPU): then both ends post every broadcast of a message at once and the CPU waits
    only at the end. Gloo works on the CPU buffers that the CPU itself fills, one piece after another."""
    return wire.type == "cuda"


def _wire_device(backend: str, device: torch.device) -> torch.device:
    """Where the buffers travel from: the GPU for NCCL; the CPU for gloo, whatever ``device`` the weights live on."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise ValueError(f"backend 'nccl' needs a cuda device and a CUDA build of torch, got {device}")
    return device if backend == "nccl" else torch.device("cpu")
