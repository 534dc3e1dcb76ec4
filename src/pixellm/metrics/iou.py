"""gIoU and cIoU of predicted masks paired with ground truth (Sec. 5.2).

Definitions (as the released evaluation):
- per-mask IoU = I / (U + 1e-5), and 1 when prediction and ground truth are both empty;
- **gIoU** = the mean of per-mask IoU over all masks of the split (masks, not images);
- **cIoU** = sum of intersections / sum of unions over the split.
Pixels equal to ``ignore_index`` in the ground truth count in neither I nor U.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


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


class MaskIoU(Metric):
    """Accumulates gIoU and cIoU over masks paired in text order; states reduce by sum across processes."""

    full_state_update = False

    def __init__(self, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        for name in ("intersection", "union", "iou_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: list[Tensor], targets: list[Tensor]) -> None:
        """Add one batch: per question (K_b, H_b, W_b) logits (on where > 0) and ground truth."""
        for pred, truth in zip(logits, targets, strict=True):
            if pred.shape[0] == 0:
                continue
            inter, union = intersection_union(pred > 0, truth, self.ignore_index)
            self.intersection += inter.sum()
            self.union += union.sum()
            self.iou_sum += mask_iou(inter, union).sum()
            self.count += inter.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"gIoU": ..., "cIoU": ...}`` (0 when nothing was seen)."""
        giou = self.iou_sum / self.count.clamp(min=1)
        ciou = self.intersection / self.union.clamp(min=1)
        return {"gIoU": giou.float(), "cIoU": ciou.float()}
