"""How ``gsrl sft`` splits each epoch between data-parallel ranks (``services.learner.sft._batches``)."""

from __future__ import annotations

import itertools

import torch

from services.learner.sft import _batches


def _samples(rank: int, world_size: int, batches: int, per_rank_batch: int) -> list[int]:
    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    drawn = itertools.islice(_batches(dataset, per_rank_batch, seed=3, rank=rank, world_size=world_size), batches)
    return [int(i) for (batch,) in drawn for i in batch]


def test_ranks_draw_disjoint_shares_that_cover_each_epoch() -> None:
    # 12 samples, 2 ranks: 6 each per epoch, in 2 batches of 3
    first, second = _samples(0, 2, 2, 3), _samples(1, 2, 2, 3)
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(12))


def test_one_rank_sees_every_sample_once_per_epoch_in_a_new_order_each_epoch() -> None:
    samples = _samples(0, 1, 8, 3)  # two epochs of 4 batches
    epoch_1, epoch_2 = samples[:12], samples[12:]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(12))
    assert epoch_1 != epoch_2


def test_the_split_is_the_single_rank_shuffle_dealt_out() -> None:
    # same seed, same permutation: rank r takes every world_size-th sample of it from position r
    whole = _samples(0, 1, 4, 3)
    assert _samples(0, 3, 1, 4) == whole[0::3]
    assert _samples(2, 3, 1, 4) == whole[2::3]
