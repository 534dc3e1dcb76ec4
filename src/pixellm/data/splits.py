"""Evaluation splits: what a data module tells the task about each of its val/test dataloaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EvalMode = Literal["teacher_forced", "generate"]
EVAL_MODES = ("teacher_forced", "generate")


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation dataloader.

    Attributes:
        name: The split's name in logs and result tables ("val", "testA", "test_less", ...).
        mode: "teacher_forced": masks decoded from the ground-truth answer's codebook tokens and
            paired in text order (the released ``validate``; refCOCO family); "generate": the
            answer is generated and its masks matched to the ground truth (MUSE, multi-referring).
            Its batches come from the "train" or the "generate" collate mode respectively.
    """

    name: str
    mode: EvalMode = "teacher_forced"

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"evaluation mode of split {self.name!r} must be one of {EVAL_MODES}, got {self.mode!r}")

    @property
    def collate_mode(self) -> str:
        """The collate mode whose batches this split evaluates."""
        return "train" if self.mode == "teacher_forced" else "generate"
