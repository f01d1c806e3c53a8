"""How ``gsrl sft`` shares demonstrations between data-parallel ranks (``rank_episodes``) and draws batches
(``_batches``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from services.learner.sft import _batches, rank_episodes


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_episode_shares_that_cover_every_dataset(world_size: int) -> None:
    counts = [5, 4, 7]
    shares = [rank_episodes(counts, rank, world_size) for rank in range(world_size)]
    for dataset, count in enumerate(counts):
        owned = [episode for share in shares for episode in share[dataset]]
        assert sorted(owned) == list(range(count))  # every episode once, by exactly one rank
    # Dealt round-robin over all datasets' episodes: the ranks' totals differ by at most one.
    totals = [sum(len(episodes) for episodes in share) for share in shares]
    assert max(totals) - min(totals) <= 1 and sum(totals) == sum(counts)


def test_the_deal_continues_across_datasets() -> None:
    # 3 + 3 episodes, 2 ranks: the global order is d0e0 d0e1 d0e2 d1e0 d1e1 d1e2, dealt 0 1 0 1 0 1
    assert rank_episodes([3, 3], 0, 2) == [[0, 2], [1]]
    assert rank_episodes([3, 3], 1, 2) == [[1], [0, 2]]


def _samples(batches: int, batch_size: int, seed: int = 3) -> list[int]:
    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    drawn = itertools.islice(_batches(dataset, batch_size, seed=seed), batches)
    return [int(i) for (batch,) in drawn for i in batch]


def test_every_sample_once_per_epoch_in_a_new_order_each_epoch() -> None:
    samples = _samples(8, 3)  # two epochs of 4 batches
    epoch_1, epoch_2 = samples[:12], samples[12:]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(12))
    assert epoch_1 != epoch_2


def test_the_seed_decides_the_order() -> None:
    assert _samples(4, 3, seed=3) == _samples(4, 3, seed=3)
    assert _samples(4, 3, seed=3) != _samples(4, 3, seed=4)


def test_every_batch_is_full_so_a_compiled_model_never_sees_a_new_shape() -> None:
    """10 samples in batches of 4: each epoch gives 2 full batches and leaves 2 samples to later epochs."""
    batches = list(itertools.islice(_batches(torch.utils.data.TensorDataset(torch.arange(10)), 4, seed=0), 50))
    assert {len(batch[0]) for batch in batches} == {4}
    seen = torch.cat([batch[0] for batch in batches])
    assert set(seen.tolist()) == set(range(10))  # a new permutation each epoch: no sample is left out for good


def test_a_dataset_smaller_than_a_batch_is_one_batch_each_step() -> None:
    batches = list(itertools.islice(_batches(torch.utils.data.TensorDataset(torch.arange(3)), 4, seed=0), 3))
    assert [sorted(batch[0].tolist()) for batch in batches] == [[0, 1, 2]] * 3
