"""Pairing predicted masks with ground-truth masks, one question at a time (Sec. 4.3).

Every function here is pure and deterministic, and vectorised over masks and pixels: a question's
IoU matrix comes from one matrix product over the pixels where any of its masks is on, and the
assignment from ``scipy.optimize.linear_sum_assignment``.

A question with P predictions and G ground truths yields M = max(P, G) pairs: min(P, G) matched
pairs, then each unmatched prediction paired with an empty ground truth (I = 0, U = |pred|), then
each unmatched ground truth paired with an empty prediction (I = 0, U = |truth|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
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


def _block_size(pixels: int) -> int:
    """The largest of 64, 32, ..., 1 that divides ``pixels``."""
    return next(b for b in (64, 32, 16, 8, 4, 2, 1) if pixels % b == 0)


def _compact(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """The question's masks restricted to the blocks of pixels where any of its masks is non-zero.

    Every other pixel adds 0 to every I and U, so counting on the kept pixels is exact, and it
    reads each mask once instead of once per pair.

    Args:
        pred: (P, H, W) bool.
        truth: (G, H, W) uint8/long ground truth.

    Returns:
        (P, n) bool and (G, n) ground truth, n a multiple of the block size.
    """
    pixels = truth.shape[1] * truth.shape[2]
    block = _block_size(pixels)
    pred = pred.reshape(pred.shape[0], pixels // block, block)  # (P, N/b, b)
    truth = truth.reshape(truth.shape[0], pixels // block, block)  # (G, N/b, b)
    on = truth.amax(0) if truth.shape[0] else truth.new_zeros(truth.shape[1:])  # (N/b, b)
    if pred.shape[0]:
        pred_on = pred.view(torch.uint8).amax(0)
        on = torch.maximum(on, pred_on if on.dtype == torch.uint8 else pred_on.to(on.dtype))
    kept = on.amax(1).nonzero().flatten()  # (n/b,) blocks with a non-zero pixel
    return pred.index_select(1, kept).flatten(1), truth.index_select(1, kept).flatten(1)


def question_counts(pred: Tensor, truth: Tensor, ignore_index: int = 255) -> PairwiseCounts:
    """I and U of every prediction against every ground truth of one question, from one matrix
    product over its compacted pixels (``_compact``).

    Args:
        pred: (P, H, W) bool.
        truth: (G, H, W) in {0, 1, ignore_index}; ignored pixels count in neither I nor U of that
            ground truth.
    """
    if pred.shape[1:] != truth.shape[1:]:
        raise ValueError(f"predictions {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in size")
    pred, truth = _compact(pred, truth)  # (P, n), (G, n)
    dtype = torch.float32 if pred.shape[1] < EXACT_FLOAT32_PIXELS else torch.float64
    num_gt = truth.shape[0]
    foreground = truth == 1  # (G, n)
    ones = foreground.new_ones(1, foreground.shape[1])  # (1, n): its product is |pred|
    columns = torch.cat([foreground, truth != ignore_index, ones]).to(dtype)  # (2G + 1, n)
    products = (pred.to(dtype) @ columns.T).cpu().numpy().astype(np.float64)  # (P, 2G + 1)
    inter = products[:, :num_gt]  # (P, G)
    pred_valid = products[:, num_gt : 2 * num_gt]  # (P, G) |pred & valid_g|
    gt_size = foreground.sum(1).cpu().numpy().astype(np.float64)  # (G,)
    return PairwiseCounts(
        torch.from_numpy(inter),
        torch.from_numpy(pred_valid + gt_size[None, :] - inter),
        torch.from_numpy(products[:, 2 * num_gt]),
        torch.from_numpy(gt_size),
    )


def pairwise_counts(
    preds: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[PairwiseCounts]:
    """``question_counts`` of every question of a batch.

    One matrix product per question: padding the compacted masks of a batch to one batched
    product cost more in zero-filling and conversion than it saved (measured with
    benchmarks/metrics.py).

    Args:
        preds: B tensors (P_b, H_b, W_b) bool.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction sets but {len(targets)} ground-truth sets")
    counts = []
    for b, (pred, truth) in enumerate(zip(preds, targets, strict=True)):
        try:
            counts.append(question_counts(pred, truth, ignore_index))
        except ValueError as error:
            raise ValueError(f"question {b}: {error}") from error
    return counts


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
        counts: the question's pixel counts (on the CPU).
    """
    num_pred, num_gt = counts.intersection.shape
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())  # rows ascending
    free_pred, free_gt = np.ones(num_pred, dtype=bool), np.ones(num_gt, dtype=bool)
    free_pred[rows], free_gt[cols] = False, False
    lone_pred, lone_gt = np.flatnonzero(free_pred), np.flatnonzero(free_gt)
    inter, union = counts.intersection.numpy(), counts.union.numpy()
    none_pred, none_gt = np.full(len(lone_gt), -1), np.full(len(lone_pred), -1)
    return MatchedPairs(
        pred_index=torch.from_numpy(np.concatenate([rows, lone_pred, none_pred]).astype(np.int64)),
        gt_index=torch.from_numpy(np.concatenate([cols, none_gt, lone_gt]).astype(np.int64)),
        intersection=torch.from_numpy(np.concatenate([inter[rows, cols], np.zeros(len(lone_pred) + len(lone_gt))])),
        union=torch.from_numpy(
            np.concatenate([union[rows, cols], counts.pred_size.numpy()[lone_pred], counts.gt_size.numpy()[lone_gt]])
        ),
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
