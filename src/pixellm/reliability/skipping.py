"""Skipping bad samples: any ``Dataset[Sample]`` keeps training when one of its items is unusable.

Three parts, each usable alone:

- ``SkipBadSamples`` wraps a dataset: an item whose loading raises ``DataError`` becomes a
  ``SkippedSample`` (index and message) instead of an exception in a DataLoader worker;
- ``SkipFilteringCollate`` wraps a collate function: it drops ``SkippedSample`` items (and samples
  the collate function refuses with ``DataError``), collates the rest and lists the skipped ones
  under ``batch["skipped"]`` (absent from batches where nothing was skipped). Masks are never re-paired: a sample is dropped whole, with its masks.
  The counts travel with the batch, so they reach the main process from any worker;
- ``SkippedSamplesReport`` (a Callback) counts them per stage, warns with a summary at the end of
  each epoch and stops the run with that summary (``SkipLimitExceeded``) once more than
  ``max_skipped_fraction`` of an epoch's samples are skipped.

A batch whose samples were all skipped is ``{"skipped": [...], "meta": []}`` (see
``is_empty_batch``); the task skips its step. Only ``DataError`` is skipped: other exceptions are
bugs and stop the run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning import Callback, LightningModule, Trainer
from torch.utils.data import Dataset

from pixellm.data.errors import DataError
from pixellm.data.sample import Sample

SKIPPED_KEY = "skipped"
REASONS_KEPT = 5  # distinct messages quoted per stage in a summary


@dataclass  # not frozen: Lightning's batch_to_device rebuilds dataclasses field by field
class SkippedSample:
    """A dataset item that could not be used.

    Attributes:
        index: Its index in the wrapped dataset; ``None`` when the collate function refused it.
        reason: The ``DataError`` message (file, record, field, what to do).
    """

    index: int | None
    reason: str


class SkipBadSamples(Dataset):
    """``dataset[i]``, or a ``SkippedSample`` when loading item ``i`` raises ``DataError``.

    Args:
        dataset: Any map-style dataset of ``Sample``.
    """

    def __init__(self, dataset: Dataset[Sample]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        try:
            return self.dataset[index]
        except DataError as err:
            return SkippedSample(index, str(err))


def is_empty_batch(batch: Any) -> bool:
    """Whether every sample of ``batch`` was skipped (the task then skips the step)."""
    return isinstance(batch, dict) and SKIPPED_KEY in batch and not batch.get("meta")


class SkipFilteringCollate:
    """Collate the usable samples of a list; list the skipped ones under ``batch["skipped"]``.

    Picklable, so it runs in DataLoader workers. The first skip in each process is also warned
    about at once, so a skip is never silent even without ``SkippedSamplesReport``.

    Args:
        collate: The collate function of usable samples (e.g. ``MuseCollator``).
    """

    def __init__(self, collate: Callable[[list[Sample]], dict[str, Any]]) -> None:
        self.collate = collate
        self.warned = False

    def __getattr__(self, name: str) -> Any:
        """The wrapped collate function's attributes (``encoder``, ``mode``, ...)."""
        if name == "collate":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.collate, name)

    def _refused(self, samples: list[Sample]) -> tuple[list[Sample], list[SkippedSample]]:
        """Split ``samples`` into those ``collate`` accepts alone and those it refuses (tried
        with its ``check(sample)`` where it has one, so the trials are not counted as batches)."""
        check = getattr(self.collate, "check", None) or (lambda sample: self.collate([sample]))
        kept, refused = [], []
        for sample in samples:
            try:
                check(sample)
                kept.append(sample)
            except DataError as err:
                refused.append(SkippedSample(None, str(err)))
        return kept, refused

    def __call__(self, items: list[Sample | SkippedSample]) -> dict[str, Any]:
        samples = [s for s in items if not isinstance(s, SkippedSample)]
        skipped = [s for s in items if isinstance(s, SkippedSample)]
        batch: dict[str, Any] = {"meta": []}
        if samples:
            try:
                batch = self.collate(samples)
            except DataError:
                samples, refused = self._refused(samples)
                skipped += refused
                batch = self.collate(samples) if samples else batch
        if skipped and not self.warned:
            self.warned = True
            warnings.warn(f"skipping bad sample(s), first: {skipped[0].reason}", stacklevel=2)
        if skipped or not samples:  # clean batches keep the collate function's keys only
            batch[SKIPPED_KEY] = skipped
        return batch


@dataclass
class SkipTally:
    """Counts of one stage's epoch: samples used, samples skipped and the first reasons."""

    used: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, batch: dict[str, Any]) -> None:
        """Count one collated batch."""
        self.used += len(batch.get("meta", ()))
        for item in batch.get(SKIPPED_KEY, ()):
            self.skipped += 1
            if len(self.reasons) < REASONS_KEPT and item.reason not in self.reasons:
                self.reasons.append(item.reason)

    def summary(self, stage: str, epoch: int) -> str:
        """One paragraph: counts, fraction and the first distinct reasons."""
        total = self.used + self.skipped
        lines = [
            f"{stage} epoch {epoch}: skipped {self.skipped} of {total} samples "
            f"({100 * self.skipped / max(total, 1):.2f} %); first reasons:"
        ]
        return "\n  ".join([*lines, *self.reasons])


class SkipLimitExceeded(RuntimeError):
    """More samples were skipped than ``SkippedSamplesReport.max_skipped_fraction`` allows."""


class SkippedSamplesReport(Callback):
    """Counts skipped samples per stage, warns a summary at each epoch end, enforces a limit.

    Counts are per process (per rank under DDP).

    Args:
        max_skipped_fraction: The run stops (``SkipLimitExceeded`` with the summary) when more than
            this fraction of an epoch's samples is skipped: at the epoch's end, or during a
            training epoch as soon as the skips alone exceed it (batches x batch size).
    """

    def __init__(self, max_skipped_fraction: float = 0.01) -> None:
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self.max_skipped_fraction = max_skipped_fraction
        self.tallies: dict[str, SkipTally] = {}

    def _count(self, stage: str, batch: Any) -> SkipTally:
        tally = self.tallies.setdefault(stage, SkipTally())
        if isinstance(batch, dict):
            tally.add(batch)
        return tally

    def _close(self, stage: str, trainer: Trainer) -> None:
        """Warn the summary of ``stage``'s epoch, raise if over the limit, start a new count."""
        tally = self.tallies.pop(stage, SkipTally())
        total = tally.used + tally.skipped
        if not tally.skipped:
            return
        summary = tally.summary(stage, trainer.current_epoch)
        if tally.skipped > self.max_skipped_fraction * total:
            raise SkipLimitExceeded(f"{summary}\nmore than {self.max_skipped_fraction:.2%} skipped")
        warnings.warn(summary, stacklevel=2)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        tally = self._count("train", batch)
        if not isinstance(batch, dict):
            return
        batch_items = len(batch.get("meta", ())) + len(batch.get(SKIPPED_KEY, ()))
        epoch_samples = trainer.num_training_batches * batch_items
        if math.isfinite(epoch_samples) and tally.skipped > self.max_skipped_fraction * epoch_samples:
            summary = tally.summary("train", trainer.current_epoch)
            raise SkipLimitExceeded(
                f"{summary}\nalready more than {self.max_skipped_fraction:.2%} of the epoch's "
                f"~{epoch_samples} samples skipped"
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("train", trainer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("val", batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("val", trainer)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("test", batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("test", trainer)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("predict", batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("predict", trainer)
