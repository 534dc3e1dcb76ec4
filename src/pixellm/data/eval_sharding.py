"""Evaluation split across processes: every process runs the same number of batches, and the
repeats that even them out are marked so that no question is scored twice.

Lightning's own ``DistributedSampler`` pads the last processes with repeats of the first samples,
which the metrics and results would count twice; an unpadded split gives processes different batch
counts, which hangs FSDP (it gathers weights collectively in every forward). ``MarkedRepeatSampler``
pads as Lightning does but shifts each repeat's key by the dataset's length; ``MarkRepeats`` reads
the same sample for it and sets ``meta[REPEAT_KEY]``, and the task and the evaluation callbacks
leave such samples out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

from pixellm.data.sample import Sample

REPEAT_KEY = "evaluation_repeat"


class MarkedRepeatSampler(DistributedSampler):
    """Every ``num_replicas``-th key from ``rank``, in dataset order; the keys past the dataset's
    end (``size + i``: a repeat of sample i) make all processes' shares equally long.

    Being a ``DistributedSampler``, Lightning does not replace it.

    Args:
        size: The dataset's length.
        num_replicas: The processes.
        rank: This process.
    """

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(size), num_replicas, rank, shuffle=False)
        self.size = size

    def __iter__(self) -> Iterator[int]:
        repeats = [self.size + i % self.size for i in range(self.total_size - self.size)]
        keys = [*range(self.size), *repeats]
        return iter(keys[self.rank : self.total_size : self.num_replicas])


class MarkRepeats(Dataset[Sample]):
    """``dataset[key]``, and for a key past its end (``MarkedRepeatSampler``) the same sample
    ``dataset[key - len]`` with ``meta[REPEAT_KEY] = True``."""

    def __init__(self, dataset: Dataset[Sample]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Sample:
        size = len(self.dataset)
        sample = self.dataset[key % size]
        if key < size:
            return sample
        return dataclasses.replace(sample, meta={**sample.meta, REPEAT_KEY: True})


def is_repeat(meta: dict) -> bool:
    """Whether a sample's ``meta`` marks it as a repeat that only evens out the processes."""
    return bool(meta.get(REPEAT_KEY))
