"""A training data order that depends only on (seed, epoch, batch index), and resumes mid-epoch.

Lightning 2.6 restores the model, optimizer, LR scheduler and loop counters from a checkpoint,
calls ``set_epoch`` on samplers, and restores a dataloader's position only if the dataloader
itself has ``state_dict`` / ``load_state_dict`` (it saves them under ``loops.fit_loop.state_dict
.combined_loader``, and loads them before it creates the epoch's iterator). A plain shuffled
DataLoader restarts the interrupted epoch from its first batch with another permutation.

``EpochShuffleSampler`` makes epoch ``e``'s permutation a function of (seed, e) alone (the order
a seeded ``DataLoader(shuffle=True)`` gives over whole epochs, so earlier runs keep their order),
and ``ResumableDataLoader`` saves ``{"epoch", "batches"}`` (batches the training loop consumed in
that epoch) and, when loaded, skips that many batches of the epoch's order without reading them.
It skips them in whatever sampler it has: Lightning's ``DistributedSampler`` under DDP, the training
mixture's ``MixtureSampler``, or a user's, each of which orders an epoch by (seed, epoch). So a run
killed at any step and resumed with ``ckpt_path="last"`` sees exactly the batches an uninterrupted
run sees, on one device or several.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochShuffleSampler(RandomSampler):
    """A permutation of ``range(num_samples)`` that is a pure function of (seed, epoch).

    A ``RandomSampler``, so that under DDP Lightning sees a shuffled loader and gives each rank
    its ``DistributedSampler`` (shuffled per epoch) in place of this one.

    Args:
        num_samples: Items of the dataset.
        seed: Seed of every epoch's permutation.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        super().__init__(range(num_samples))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this before every epoch)."""
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        """The order of ``epoch``: the one ``DataLoader(shuffle=True)`` with a generator seeded
        ``seed`` gives in that epoch, if every earlier epoch was read to its end (each epoch its
        iterator draws a worker seed, then its ``RandomSampler`` two permutations)."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(self.num_samples, generator=generator)
            torch.randperm(self.num_samples, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.permutation(self.epoch)

    def __len__(self) -> int:
        return self.num_samples


class _ResumingSampler:
    """The index sampler a ``ResumableDataLoader`` iterates: its own (batches of indices, or indices),
    less the batches a resume skips, which are drawn but never loaded; its length stays the epoch's.

    The epoch and the skip are read at the first draw, not at ``iter()``: Lightning sets the sampler's
    epoch between creating the epoch's iterator and drawing from it.
    """

    def __init__(self, sampler: Iterable[Any], loader: ResumableDataLoader) -> None:
        self.sampler, self.loader = sampler, loader

    def __iter__(self) -> Iterator[Any]:
        start = self.loader._begin_epoch()  # before iter(): MixtureSampler moves its epoch on
        yield from itertools.islice(iter(self.sampler), start, None)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class _CountingIterator:
    """Pass batches through and count them."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator
        self.count = 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.count += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the running epoch Lightning checkpoints.

    Takes DataLoader's arguments. The epoch is the sampler's ``epoch`` (set by Lightning's
    ``set_epoch`` before each epoch; 0 for a sampler without one).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter: _CountingIterator | None = None
        self._epoch = 0  # of the running iteration
        self._start = 0  # batches its order skipped
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip in it), used once

    @property
    def _index_sampler(self) -> _ResumingSampler:
        # what DataLoader iterators draw batches (or indices) from
        return _ResumingSampler(super()._index_sampler, self)

    def _begin_epoch(self) -> int:
        """At the first draw of an epoch: note the epoch, and return the batches to skip in it."""
        self._epoch = int(getattr(self.sampler, "epoch", 0))
        self._start = self._resume[1] if self._resume is not None and self._resume[0] == self._epoch else 0
        self._resume = None
        return self._start

    def __iter__(self) -> Iterator[Any]:
        self._start = 0
        self._counter = _CountingIterator(super().__iter__())
        return self._counter

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the running epoch and the batches consumed in it."""
        consumed = 0 if self._counter is None else self._counter.count
        return {"epoch": self._epoch, "batches": self._start + consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration of ``state["epoch"]`` start after ``state["batches"]``."""
        if state:
            self._resume = (int(state["epoch"]), int(state["batches"]))
            set_epoch = getattr(self.sampler, "set_epoch", None)
            if set_epoch is not None:  # Lightning sets it too, before the epoch's iteration
                set_epoch(self._resume[0])
