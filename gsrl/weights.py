"""Versioned weight broadcast from learner rank 0 to the policy servers: the publisher and subscriber ends.

This module is the live channel: who is in the broadcast group, when it is rebuilt, and how each publish travels.
The group protocol both ends share (process-group construction, wire header, Redis control keys and what they
mean) lives in ``gsrl.weight_group``; what the bytes look like (layout, hash, buckets) in ``gsrl.weight_layout``;
the Redis snapshot that a policy server loads at start in ``gsrl.weight_snapshot``.

A publish reads the live set; if it differs from the group's members the publisher moves to a new generation
(two-phase: each member sets ``joined/{rank}`` in the store, then the publisher sets ``commit`` to ``go`` or
``abort``), so a member that died but still looks live costs at most ``timeout_s`` and is left out, never a hang.
Each message is a header (int64), a bucket descriptor, then the buckets (see ``gsrl.weight_layout``). The
subscriber checks the layout hash against its template and refuses a mismatch (it still receives the bytes, so the
group stays in step).

NCCL: by default PyTorch tears the process down when a NCCL collective times out
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``); entry points that use ``backend="nccl"`` should set it to ``2`` so a dead
policy server costs one failed publish instead of the learner.
"""

from gsrl.weight_publisher import PublishStats, WeightPublisher
from gsrl.weight_subscriber import WeightSubscriber

__all__ = ["PublishStats", "WeightPublisher", "WeightSubscriber"]
