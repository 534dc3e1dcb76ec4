"""Pairing predicted masks with ground-truth masks, one question at a time (Sec. 4.3).

Every function here is pure and deterministic. The IoU matrices of a whole batch come from one
batched matrix product; only the assignment itself (``scipy.optimize.linear_sum_assignment``) runs
per question.

A question with P predictions and G ground truths yields M = max(P, G) pairs: min(P, G) matched
pairs, then each unmatched prediction paired with an empty ground truth (I = 0, U = |pred|), then
each unmatched ground truth paired with an empty prediction (I = 0, U = |truth|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pixellm.metrics.iou import intersection_union, mask_iou

MatchCost = Literal["iou", "bce_dice"]
MATCH_COSTS = ("iou", "bce_dice")
EXACT_FLOAT32_PIXELS = 2**24  # pixel counts up to this are exact in float32 matrix products


@dataclass(frozen=True)
class MatchedPairs:
    """The M = max(P, G) (prediction, ground truth) pairs of one question.

    Attributes:
        pred_index: (M,) long, the prediction of each pair; -1 for an empty prediction.
        gt_index: (M,) long, the ground truth of each pair; -1 for an empty ground truth.
        intersection: (M,) float64 pixel counts.
        union: (M,) float64 pixel counts.
        num_targets: G, the question's ground-truth count (selects its few/many group).
    """

    pred_index: Tensor
    gt_index: Tensor
    intersection: Tensor
    union: Tensor
    num_targets: int

    def iou(self) -> Tensor:
        """(M,) per-pair IoU, I / (U + 1e-5), 1 for an empty pair."""
        return mask_iou(self.intersection, self.union)

    def gt_of_prediction(self, num_predictions: int) -> list[int | None]:
        """The matched ground truth of each prediction 0..P-1, ``None`` where unmatched."""
        matched: list[int | None] = [None] * num_predictions
        for pred, gt in zip(self.pred_index.tolist(), self.gt_index.tolist(), strict=True):
            if pred >= 0 and gt >= 0:
                matched[pred] = gt
        return matched


@dataclass(frozen=True)
class PairwiseCounts:
    """Pixel counts of every (prediction, ground truth) combination of one question.

    Attributes:
        intersection: (P, G) float64.
        union: (P, G) float64.
        pred_size: (P,) float64, |pred|: the union of a prediction with an empty ground truth.
        gt_size: (G,) float64, |truth|: the union of a ground truth with an empty prediction.
    """

    intersection: Tensor
    union: Tensor
    pred_size: Tensor
    gt_size: Tensor


def _flatten_padded(masks: list[Tensor], count: int, pixels: int, dtype: torch.dtype) -> Tensor:
    """(B, count, pixels) zero-padded stack of B (K_b, H_b, W_b) masks (zeros add nothing to a count)."""
    out = torch.zeros(len(masks), count, pixels, dtype=dtype, device=masks[0].device)
    for b, mask in enumerate(masks):
        out[b, : mask.shape[0], : mask.shape[1] * mask.shape[2]] = mask.flatten(1)
    return out


def pairwise_counts(
    preds: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[PairwiseCounts]:
    """I and U of every prediction against every ground truth, for a batch of questions at once.

    Args:
        preds: B tensors (P_b, H_b, W_b) bool.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}; ignored pixels count in
            neither I nor U of that ground truth.

    Returns:
        One ``PairwiseCounts`` per question.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction sets but {len(targets)} ground-truth sets")
    for b, (pred, truth) in enumerate(zip(preds, targets, strict=True)):
        if pred.shape[1:] != truth.shape[1:]:
            raise ValueError(f"question {b}: predictions {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in size")
    if not preds:
        return []
    pixels = max(t.shape[1] * t.shape[2] for t in targets)
    dtype = torch.float32 if pixels < EXACT_FLOAT32_PIXELS else torch.float64
    num_pred = max(p.shape[0] for p in preds)
    num_gt = max(t.shape[0] for t in targets)
    pred = _flatten_padded(preds, num_pred, pixels, dtype)  # (B, P, N)
    truth = _flatten_padded([t == 1 for t in targets], num_gt, pixels, dtype)  # (B, G, N)
    inter = torch.bmm(pred, truth.transpose(1, 2)).double()  # (B, P, G)
    pred_size = pred.sum(2, dtype=torch.float64)  # (B, P)
    gt_size = truth.sum(2, dtype=torch.float64)  # (B, G)
    if any(bool((t == ignore_index).any()) for t in targets):
        valid = _flatten_padded([t != ignore_index for t in targets], num_gt, pixels, dtype)
        pred_valid = torch.bmm(pred, valid.transpose(1, 2)).double()  # (B, P, G) |pred & valid_g|
    else:
        pred_valid = pred_size[:, :, None].expand_as(inter)
    union = pred_valid + gt_size[:, None, :] - inter  # (B, P, G)
    return [
        PairwiseCounts(
            intersection=inter[b, : p.shape[0], : t.shape[0]],
            union=union[b, : p.shape[0], : t.shape[0]],
            pred_size=pred_size[b, : p.shape[0]],
            gt_size=gt_size[b, : t.shape[0]],
        )
        for b, (p, t) in enumerate(zip(preds, targets, strict=True))
    ]


def bce_dice_cost(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """The released code's matching cost: mean sigmoid-BCE + DICE loss of every pair (Mask2Former).

    The release evaluates it on 12,544 randomly sampled points (nondeterministic); this uses
    every pixel, so the matching is repeatable. BCE and DICE are weighted equally, as
    Mask2Former's 5 : 5.

    Args:
        logits: (P, H, W) predicted mask logits.
        target: (G, H, W) ground truth in {0, 1, ignore_index}.

    Returns:
        (P, G) float64 cost.
    """
    x = logits.flatten(1).double()  # (P, N)
    valid = (target != ignore_index).flatten(1).double()  # (G, N)
    truth = (target == 1).flatten(1).double()  # (G, N)
    pixels = valid.sum(1).clamp(min=1)  # (G,)
    bce = (torch.nn.functional.softplus(x) @ valid.T - x @ truth.T) / pixels  # (P, G)
    prob = x.sigmoid()
    numerator = 2 * prob @ truth.T  # (P, G)
    denominator = prob @ valid.T + truth.sum(1)[None, :]  # (P, G)
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce + dice


def hungarian_pairs(cost: Tensor, counts: PairwiseCounts) -> MatchedPairs:
    """The minimum-cost one-to-one assignment, completed with empty-mask pairs (see module doc).

    Args:
        cost: (P, G) cost of pairing prediction p with ground truth g.
        counts: the question's pixel counts.
    """
    num_pred, num_gt = counts.intersection.shape
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())  # rows ascending
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    cols_t = torch.as_tensor(cols, dtype=torch.long)
    free_pred = torch.ones(num_pred, dtype=torch.bool)
    free_pred[rows_t] = False
    free_gt = torch.ones(num_gt, dtype=torch.bool)
    free_gt[cols_t] = False
    lone_pred = free_pred.nonzero().flatten()
    lone_gt = free_gt.nonzero().flatten()
    device = counts.intersection.device
    inter = counts.intersection[rows_t.to(device), cols_t.to(device)]
    union = counts.union[rows_t.to(device), cols_t.to(device)]
    zeros = inter.new_zeros(len(lone_pred) + len(lone_gt))
    minus = torch.full((len(lone_pred),), -1, dtype=torch.long), torch.full((len(lone_gt),), -1, dtype=torch.long)
    return MatchedPairs(
        pred_index=torch.cat([rows_t, lone_pred, minus[1]]),
        gt_index=torch.cat([cols_t, minus[0], lone_gt]),
        intersection=torch.cat([inter, zeros]).cpu(),
        union=torch.cat([union, counts.pred_size[lone_pred.to(device)], counts.gt_size[lone_gt.to(device)]]).cpu(),
        num_targets=num_gt,
    )


def match_batch(
    logits: list[Tensor],
    targets: list[Tensor],
    cost: MatchCost = "iou",
    ignore_index: int = 255,
) -> list[MatchedPairs]:
    """Hungarian matching of predicted to ground-truth masks for every question of a batch.

    Args:
        logits: B tensors (P_b, H_b, W_b): mask logits (a mask is where > 0) or bool masks.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}.
        cost: "iou": 1 - IoU (the paper's wording); "bce_dice": the released code's cost
            (``bce_dice_cost``; needs logits, not bool masks).
        ignore_index: ground-truth value of ignored pixels.

    Returns:
        One ``MatchedPairs`` per question.
    """
    if cost not in MATCH_COSTS:
        raise ValueError(f"matching cost must be one of {MATCH_COSTS}, got {cost!r}")
    masks = [x if x.dtype == torch.bool else x > 0 for x in logits]
    counts = pairwise_counts(masks, targets, ignore_index)
    pairs = []
    for x, truth, count in zip(logits, targets, counts, strict=True):
        if cost == "iou":
            matrix = 1 - mask_iou(count.intersection, count.union)
        else:
            if x.dtype == torch.bool:
                raise ValueError("the 'bce_dice' matching cost needs mask logits, got bool masks")
            matrix = bce_dice_cost(x, truth, ignore_index)
        pairs.append(hungarian_pairs(matrix, count))
    return pairs


def text_order_pairs(
    logits: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[MatchedPairs]:
    """Pairs in text order (teacher forcing): prediction k with ground truth k.

    Args:
        logits: B tensors (K_b, H_b, W_b) mask logits (a mask is where > 0).
        targets: B tensors (K_b, H_b, W_b) in {0, 1, ignore_index}.
    """
    pairs = []
    for question, (x, truth) in enumerate(zip(logits, targets, strict=True)):
        if x.shape[0] != truth.shape[0]:
            raise ValueError(f"question {question}: {x.shape[0]} predictions but {truth.shape[0]} ground-truth masks")
        inter, union = intersection_union(x > 0, truth, ignore_index)
        index = torch.arange(x.shape[0])
        pairs.append(MatchedPairs(index, index, inter.cpu(), union.cpu(), truth.shape[0]))
    return pairs


def concatenate(pairs: list[MatchedPairs]) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs of many questions as flat (M,) intersection, union and per-pair target count,
    the input of ``PairedMaskIoU.update``."""
    if not pairs:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    counts = torch.cat([torch.full((len(p.intersection),), p.num_targets, dtype=torch.long) for p in pairs])
    return torch.cat([p.intersection for p in pairs]), torch.cat([p.union for p in pairs]), counts
