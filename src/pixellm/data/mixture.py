"""The training mixture: datasets sampled by ratio, a fixed number of samples per epoch, named
evaluation sets.

The release trains on four groups drawn with rates sem_seg 2 : refer_seg 9 : vqa 2 : MUSE 4 (see
REFERENCE.md), each group choosing one of its datasets uniformly (refCOCO, refCOCO+, ... ), then one
item uniformly, for 500 steps x 2 x 10 accumulation x 8 GPUs = 80,000 samples per epoch. Here a
group is a ``MixtureGroup`` whose datasets carry sub-ratios (1 each reproduces the release), and the
order of an epoch is a pure function of ``(seed, epoch)``: it is drawn in the main process by
``MixtureSampler``, so it does not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from pixellm.data.datamodule import SampleDataModule
from pixellm.data.sample import Sample
from pixellm.data.splits import EvalMode, EvalSplit


@dataclass
class MixtureSource:
    """One dataset of a group.

    Attributes:
        dataset: Any ``Dataset`` of ``pixellm.data.sample.Sample`` (``class_path`` in YAML).
        ratio: Its share within the group, relative to the other datasets of the group.
    """

    dataset: Dataset
    ratio: float = 1.0


@dataclass
class MixtureGroup:
    """A group of datasets drawn with one rate (release: sem_seg, refer_seg, vqa, MUSE).

    Attributes:
        name: The group's name (in error messages and ``MixtureDataModule.probabilities``).
        ratio: Its share of the mixture, relative to the other groups.
        datasets: Its datasets with their sub-ratios.
    """

    name: str
    ratio: float
    datasets: list[MixtureSource] = field(default_factory=list)


@dataclass
class EvalSet:
    """One named evaluation dataset.

    Attributes:
        name: Its name in logs and result tables ("val", "testA", "test_less", ...).
        dataset: Any ``Dataset`` of ``Sample``.
        mode: "teacher_forced" or "generate" (see ``pixellm.data.splits.EvalSplit``).
    """

    name: str
    dataset: Dataset
    mode: EvalMode = "teacher_forced"


def source_probabilities(groups: list[MixtureGroup]) -> list[float]:
    """P(dataset) of every source in group order: group share times share within the group.

    Raises:
        ValueError: On a negative ratio, a group without datasets or with ratios summing to 0,
            an empty dataset that would be drawn, or all ratios 0 (names the group and source).
    """
    if not groups:
        raise ValueError("the training mixture needs at least one group")
    total = sum(g.ratio for g in groups)
    if total <= 0:
        raise ValueError(f"the mixture's group ratios sum to {total}; at least one must be above 0")
    probabilities = []
    for g in groups:
        sub_total = sum(s.ratio for s in g.datasets)
        if g.ratio < 0 or any(s.ratio < 0 for s in g.datasets) or not g.datasets or sub_total <= 0:
            raise ValueError(
                f"mixture group {g.name!r}: needs ratio >= 0 and datasets with ratios >= 0 summing "
                f"above 0, got ratio {g.ratio} and {[s.ratio for s in g.datasets]}"
            )
        for i, s in enumerate(g.datasets):
            p = g.ratio / total * s.ratio / sub_total
            if p > 0 and len(s.dataset) == 0:
                raise ValueError(f"mixture group {g.name!r}: dataset {i} ({type(s.dataset).__name__}) is empty")
            probabilities.append(p)
    return probabilities


class MixtureSampler(DistributedSampler):
    """Keys into the concatenation of datasets: a dataset drawn by probability, then one of its
    items uniformly, ``num_samples`` times per epoch over all replicas, from
    ``numpy.random.default_rng([seed, epoch])``; replica ``rank`` takes every ``num_replicas``-th.
    A key is ``epoch * N + index`` (N: the concatenation's length), so ``EpochConcatDataset`` can let
    each dataset draw its random choices anew every epoch.

    ``set_epoch`` (Lightning calls it every epoch, also after a resume) picks the epoch; without it
    each pass moves on to the next epoch. Being a ``DistributedSampler``, it is not wrapped again
    by Lightning on several devices.

    Args:
        sizes: Length of each dataset, in concatenation order.
        probabilities: Probability of each dataset (summing to 1).
        num_samples: Indices per epoch over all replicas (a multiple of ``num_replicas`` is used).
        seed: Seed of the order.
        num_replicas: Processes sharing the epoch (the distributed world size).
        rank: This process's index among them.
    """

    def __init__(
        self,
        sizes: list[int],
        probabilities: list[float],
        num_samples: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(sizes) != len(probabilities) or num_samples < num_replicas:
            raise ValueError(
                f"need one probability per dataset and num_samples >= num_replicas, got {len(sizes)} "
                f"sizes, {len(probabilities)} probabilities, num_samples={num_samples}, num_replicas={num_replicas}"
            )
        super().__init__(range(num_samples), num_replicas, rank, shuffle=False, seed=seed, drop_last=True)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=np.float64) / sum(probabilities)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.epoch += 1
        which = rng.choice(len(self.sizes), size=self.total_size, p=self.probabilities)  # (n,)
        within = (rng.random(self.total_size) * self.sizes[which]).astype(np.int64)  # (n,)
        keys = epoch * int(self.sizes.sum()) + self.offsets[which] + within  # (n,) into the concatenation
        return iter(keys[self.rank : self.total_size : self.num_replicas].tolist())


class EpochConcatDataset(ConcatDataset):
    """The concatenation of the training datasets, read by ``MixtureSampler``'s keys
    ``epoch * len(self) + index``.

    A dataset with a ``draw(index, epoch)`` method makes item ``index`` anew for each epoch, as the
    release re-draws at every read: ``MultiReferDataset`` and the semantic segmentation sets deal an
    image's targets into questions, so its targets beyond one deal are trained on in later epochs, and
    they, ``ReferDataset`` and ``ReasonSegDataset`` draw their templates anew; any other dataset is read
    as ``dataset[index]``.
    """

    def __getitem__(self, key: int) -> Sample:
        epoch, index = divmod(key, len(self))
        source = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[source - 1] if source else 0)
        dataset = self.datasets[source]
        draw = getattr(dataset, "draw", None)
        return dataset[local] if draw is None else draw(local, epoch)


class MixtureDataModule(SampleDataModule):
    """Training on a ratio-sampled mixture of datasets; validation/test on named evaluation sets.

    Args:
        train: The groups of training datasets with their ratios.
        samples_per_epoch: Training samples (questions) per epoch over all devices (release:
            500 steps x 2 per GPU x 10 accumulation x 8 GPUs = 80,000).
        val: Evaluation sets of ``pixellm validate`` and of validation during ``fit`` (one
            dataloader each, in order); the first is also ``pixellm predict``'s.
        test: Evaluation sets of ``pixellm test``.
        kwargs: The arguments of ``SampleDataModule`` (``tokenizer``, ``image_size``, ...).
    """

    def __init__(
        self,
        train: list[MixtureGroup],
        samples_per_epoch: int = 80_000,
        val: list[EvalSet] | None = None,
        test: list[EvalSet] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["train", "val", "test"])  # datasets are not hyper-parameters
        self.groups = list(train)
        self.probabilities = source_probabilities(self.groups)
        sources = [s.dataset for g in self.groups for s in g.datasets]
        self.train_set = EpochConcatDataset(sources)
        self.samples_per_epoch = samples_per_epoch
        self.eval_sets = {"val": list(val or []), "test": list(test or [])}
        for stage, sets in self.eval_sets.items():
            names = [s.name for s in sets]
            if len(set(names)) != len(names):
                raise ValueError(f"the {stage} sets need distinct names, got {names}")

    def eval_splits(self, stage: str) -> list[EvalSplit]:
        """One split per dataloader of ``stage`` ("val" or "test"), in dataloader order."""
        return [EvalSplit(s.name, s.mode) for s in self.eval_sets[stage]]

    def train_dataloader(self) -> DataLoader:
        """This process's share of ``samples_per_epoch`` teacher-forced samples drawn by
        ``MixtureSampler`` (the trainer's world size and rank split them)."""
        replicas = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None and self.trainer.world_size > 1:
            replicas = {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank}
        sizes = [len(d) for d in self.train_set.datasets]
        sampler = MixtureSampler(sizes, self.probabilities, self.samples_per_epoch, self.seed, **replicas)
        return self.loader(self.train_set, self.batch_size, "train", sampler=sampler)

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        return [
            self.eval_loader(s.dataset, split.collate_mode)
            for s, split in zip(self.eval_sets[stage], self.eval_splits(stage), strict=True)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per val set, in order, collated for its evaluation mode."""
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, in order, collated for its evaluation mode."""
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        """The first val set in generate mode: prompts only, left-padded, no labels.

        Raises:
            ValueError: If no val set is configured.
        """
        if not self.eval_sets["val"]:
            raise ValueError("`pixellm predict` with MixtureDataModule needs data.init_args.val")
        return self.loader(self.eval_sets["val"][0].dataset, self.val_batch_size, "generate")
