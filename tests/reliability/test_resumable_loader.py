"""The training order: a function of (seed, epoch, batch index), resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pixellm.data.mixture import MixtureSampler
from pixellm.reliability.resumable_loader import EpochShuffleSampler, ResumableDataLoader


def _loader(seed: int = 3) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(10)), batch_size=3, drop_last=True,
                               sampler=EpochShuffleSampler(10, seed))


def test_order_equals_a_seeded_shuffled_dataloader_over_whole_epochs() -> None:
    plain = DataLoader(list(range(10)), batch_size=3, drop_last=True, shuffle=True,
                       generator=torch.Generator().manual_seed(3))
    expected = [[b.tolist() for b in plain] for _ in range(3)]  # epochs 0, 1, 2
    loader = _loader()
    for epoch in (2, 0, 1):  # any epoch, in any order
        loader.sampler.set_epoch(epoch)
        assert [b.tolist() for b in loader] == expected[epoch]
    assert expected[0] != expected[1]


def test_state_resumes_after_the_consumed_batches_of_that_epoch_only() -> None:
    loader = _loader()
    loader.sampler.set_epoch(1)
    full = [b.tolist() for b in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    fresh = _loader()
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    assert [b.tolist() for b in resumed] == full[2:]
    assert fresh.state_dict() == {"epoch": 1, "batches": 3}  # 2 skipped + 1 consumed
    fresh.sampler.set_epoch(2)  # the next epoch starts at its first batch again
    assert len([b for b in fresh]) == 3


def test_any_sampler_resumes_the_same_way_on_every_process() -> None:
    """Lightning's DistributedSampler under DDP, the mixture's sampler, a plain loader: every rank
    loads rank 0's checkpointed position and goes on where an uninterrupted run would."""
    mixture = [MixtureSampler([5, 7], [0.3, 0.7], 24, seed=1, num_replicas=2, rank=r) for r in range(2)]
    shuffled = [DistributedSampler(range(24), num_replicas=2, rank=r, shuffle=True, seed=4) for r in range(2)]
    for samplers in (mixture, shuffled):
        loaders = [ResumableDataLoader(list(range(200)), batch_size=3, sampler=s, drop_last=True) for s in samplers]
        full = []
        for loader in loaders:
            loader.sampler.set_epoch(2)
            full.append([b.tolist() for b in loader])
        for loader in loaders:
            loader.sampler.set_epoch(2)
        iterator = iter(loaders[0])
        next(iterator)
        state = loaders[0].state_dict()
        assert state == {"epoch": 2, "batches": 1}
        for rank, sampler in enumerate(samplers):
            fresh = ResumableDataLoader(list(range(200)), batch_size=3, sampler=sampler, drop_last=True)
            fresh.load_state_dict(state)
            sampler.set_epoch(2)  # as Lightning does before the epoch
            assert len(fresh) == len(full[rank]) == 4  # Lightning counts the epoch's batches from it
            assert [b.tolist() for b in fresh] == full[rank][1:]
            sampler.set_epoch(3)  # the next epoch starts at its first batch again
            assert len(list(fresh)) == 4
    plain = ResumableDataLoader(list(range(4)), batch_size=2)
    assert plain.state_dict() == {"epoch": 0, "batches": 0}
    plain.load_state_dict({"epoch": 0, "batches": 1})
    assert [b.tolist() for b in plain] == [[2, 3]]
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3]]
