"""gIoU and cIoU of predicted masks paired with ground truth (Sec. 4.3, 5.2).

Definitions (as the released evaluation, but per question: see below), over the (prediction, ground
truth) pairs of a split:
- per-pair IoU = I / (U + 1e-5), and 1 when prediction and ground truth are both empty;
- per-pair score = s * IoU, where s = judge / 10 in the MUSE protocol and s = 1 otherwise, and 0 for an unassigned pair (Sec. 4.3);
- **gIoU** = sum of per-pair scores / number of pairs (the mean over masks, not images);
- **cIoU** = sum of s * I / sum of U over the split.
Pairs are in text order (teacher forcing), or from Hungarian matching, where a question with P
predictions and G ground truths gives max(P, G) pairs (unmatched ones against an empty mask), so
its score is normalised by max(P, G) (the paper's "for each question", Sec. 4.3; the release's
MUSE evaluation reads a whole image record, all its questions, as one sample and normalises by
max(sum P, sum G) over the record, which differs when one question over-predicts and another
under-predicts; cIoU is the same either way). Pixels equal to ``ignore_index`` in the ground truth count
in neither I nor U. Each score is also kept for the questions with few targets (G <= 3, MUSE
``test_less``) and many targets (G > 3, MUSE ``test_many``), as the paper's Table 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

FEW_TARGETS_MAX = 3  # MUSE test_less: <= 3 targets per question; test_many: more (Sec. 4.2)
TARGET_GROUPS = ("overall", "few", "many")  # state index 0, 1, 2


def intersection_union(pred: Tensor, target: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Per-mask intersection and union.

    Args:
        pred: (K, H, W) bool predicted masks.
        target: (K, H, W) ground truth in {0, 1, ignore_index}.

    Returns:
        Two (K,) float64 tensors: intersection and union pixel counts.
    """
    valid = target != ignore_index
    truth = (target == 1) & valid
    pred = pred & valid
    inter = (pred & truth).flatten(1).sum(1)
    union = (pred | truth).flatten(1).sum(1)
    return inter.double(), union.double()


def mask_iou(inter: Tensor, union: Tensor) -> Tensor:
    """Per-mask IoU with the empty/empty convention (1.0)."""
    return torch.where(union == 0, torch.ones_like(inter), inter / (union + 1e-5))


class PairedMaskIoU(Metric):
    """gIoU / cIoU (module docstring) of (prediction, ground truth) pairs, overall and few/many.

    States are (3,) float64 sums indexed as ``TARGET_GROUPS`` and reduce by sum across processes.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("intersection", "union", "iou_sum", "count"):
            self.add_state(name, default=torch.zeros(len(TARGET_GROUPS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, intersection: Tensor, union: Tensor, num_targets: Tensor, score: Tensor | None = None) -> None:
        """Add pairs, of any number of questions at once.

        Args:
            intersection: (M,) pixel counts of each pair.
            union: (M,) pixel counts of each pair.
            num_targets: (M,) ground-truth mask count G of each pair's question (selects few/many).
            score: (M,) weight s in [0, 1] of each pair (judge / 10); ``None`` means 1.
        """
        device = self.intersection.device
        inter = intersection.to(device, torch.float64)
        union = union.to(device, torch.float64)
        iou = mask_iou(inter, union)
        if score is not None:
            weight = score.to(device, torch.float64)
            iou, inter = iou * weight, inter * weight
        group = 1 + (num_targets.to(device) > FEW_TARGETS_MAX).long()  # (M,) 1 = few, 2 = many
        for state, values in ((self.intersection, inter), (self.union, union), (self.iou_sum, iou),
                              (self.count, torch.ones_like(iou))):
            state[0] += values.sum()
            state.index_add_(0, group, values)

    def compute(self) -> dict[str, Tensor]:
        """``{"gIoU", "cIoU", "few_gIoU", "few_cIoU", "many_gIoU", "many_cIoU"}``.

        Overall scores are 0 when nothing was seen; a few/many score is NaN when the split has
        no question of that group.
        """
        giou = self.iou_sum / self.count.clamp(min=1)
        ciou = self.intersection / self.union.clamp(min=1)
        scores = {"gIoU": giou[0].float(), "cIoU": ciou[0].float()}
        for group, name in enumerate(TARGET_GROUPS[1:], start=1):
            empty = bool(self.count[group] == 0)
            scores[f"{name}_gIoU"] = torch.tensor(math.nan) if empty else giou[group].float()
            scores[f"{name}_cIoU"] = torch.tensor(math.nan) if empty else ciou[group].float()
        return scores


class MaskIoU(PairedMaskIoU):
    """``PairedMaskIoU`` of masks paired in text order (teacher forcing).

    Args:
        ignore_index: ground-truth value of ignored pixels.
    """

    def __init__(self, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index

    def update(self, logits: list[Tensor], targets: list[Tensor]) -> None:
        """Add one batch: per question (K_b, H_b, W_b) logits (on where > 0) and ground truth."""
        for pred, truth in zip(logits, targets, strict=True):
            if pred.shape[0] == 0:
                continue
            inter, union = intersection_union(pred > 0, truth, self.ignore_index)
            super().update(inter, union, torch.full_like(inter, truth.shape[0]))
