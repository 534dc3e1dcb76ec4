"""A training data order that depends only on (seed, epoch, batch index), and resumes mid-epoch.

Lightning 2.6 restores the model, optimizer, LR scheduler and loop counters from a checkpoint,
calls ``set_epoch`` on samplers, and restores a dataloader's position only if the dataloader
itself has ``state_dict`` / ``load_state_dict`` (it saves them under ``loops.fit_loop.state_dict
.combined_loader``, and loads them before it creates the epoch's iterator). A plain shuffled
DataLoader restarts the interrupted epoch from its first batch with another permutation.

``EpochShuffleSampler`` makes epoch ``e``'s permutation a function of (seed, e) alone (the order
a seeded ``DataLoader(shuffle=True)`` gives over whole epochs, so earlier runs keep their order),
and ``ResumableDataLoader`` saves ``{"epoch", "batches"}`` (batches the training loop consumed in
that epoch) and, when loaded, starts the sampler after them. So a run killed at any step and
resumed with ``ckpt_path="last"`` sees exactly the batches an uninterrupted run sees.

Single device only: under DDP Lightning replaces the sampler with its ``DistributedSampler``
(shuffled by seed and epoch), and the loader then saves no position (Lightning warns that the
interrupted epoch restarts).
"""

from __future__ import annotations

from collections.abc import Iterator
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
        self.resume: tuple[int, int] | None = None  # (epoch, items to skip in it), used once
        self.skipped = 0  # items skipped at the start of the running iteration

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
        start = 0
        if self.resume is not None and self.resume[0] == self.epoch:
            start = self.resume[1]
        self.resume = None
        self.skipped = start
        yield from self.permutation(self.epoch)[start:]

    def __len__(self) -> int:
        return self.num_samples


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
    """A DataLoader over an ``EpochShuffleSampler`` whose position Lightning checkpoints.

    Takes DataLoader's arguments; ``sampler`` must be an ``EpochShuffleSampler`` and
    ``batch_size`` an integer for the position to be saved (otherwise ``state_dict`` is empty).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter: _CountingIterator | None = None

    def _resumable(self) -> bool:
        return isinstance(self.sampler, EpochShuffleSampler) and self.batch_size is not None

    def __iter__(self) -> Iterator[Any]:
        if self._resumable():
            self.sampler.skipped = 0  # until this iteration's sampler starts
        self._counter = _CountingIterator(super().__iter__())
        return self._counter

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the running epoch and the batches consumed in it."""
        if not self._resumable():
            return {}
        consumed = 0 if self._counter is None else self._counter.count
        return {
            "epoch": self.sampler.epoch,
            "batches": self.sampler.skipped // self.batch_size + consumed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration of ``state["epoch"]`` start after ``state["batches"]``."""
        if not state or not self._resumable():
            return
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume = (state["epoch"], state["batches"] * self.batch_size)
