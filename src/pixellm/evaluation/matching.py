"""Pairing predicted masks with ground-truth masks, one question at a time (Sec. 4.3).

Every function here is pure and deterministic, and vectorised over masks and pixels: the I and U
of every (prediction, ground truth) pair of a question come from one operation over bit-packed
masks, and its assignment from ``scipy.optimize.linear_sum_assignment``.

A question with P predictions and G ground truths yields M = max(P, G) pairs: min(P, G) matched
pairs, then each unmatched prediction paired with an empty ground truth (I = 0, U = |pred|), then
each unmatched ground truth paired with an empty prediction (I = 0, U = |truth|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pixellm.metrics.iou import intersection_union, mask_iou

MatchCost = Literal["iou", "bce_dice"]
MATCH_COSTS = ("iou", "bce_dice")


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


def _bit_rows(masks: np.ndarray) -> np.ndarray:
    """(K, N) bool masks as (K, ceil(N / 64)) uint64 rows of 64 pixels each, zero-padded."""
    bits = np.packbits(masks, axis=1)  # (K, ceil(N / 8)) uint8
    if bits.shape[1] % 8:
        bits = np.pad(bits, ((0, 0), (0, 8 - bits.shape[1] % 8)))
    return bits.view(np.uint64)


def _popcount(rows: np.ndarray) -> np.ndarray:
    """(..., W) uint64 -> (...) float64 count of set bits over the last axis."""
    return np.bitwise_count(rows).sum(-1, dtype=np.uint32).astype(np.float64)  # uint32: faster than int64


def _flat_numpy(masks: Tensor, dtype: torch.dtype) -> np.ndarray:
    """(K, H, W) tensor as a (K, H * W) CPU array of ``dtype``, without a copy where it already is one."""
    if masks.requires_grad:
        masks = masks.detach()
    if masks.device.type != "cpu" or masks.dtype != dtype:
        masks = masks.to("cpu", dtype)
    return masks.numpy().reshape(masks.shape[0], math.prod(masks.shape[1:]))


def _question_counts(
    pred: Tensor, truth: Tensor, ignore_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(P, G) intersection and union, (P,) |pred| and (G,) |truth| of one question, as float64 arrays.

    Each mask is bit-packed once (64 pixels per word), then every (prediction, ground truth)
    combination is one broadcast AND and popcount. Ignored pixels are packed and counted only
    when the ground truth holds a value above 1.
    """
    num_pred = pred.shape[0]
    truth = _flat_numpy(truth, torch.uint8)  # (G, N) {0, 1, ignore}
    pred_bits = _bit_rows(_flat_numpy(pred, torch.bool))  # (P, W)
    fg_bits = _bit_rows(truth)  # (G, W); packbits sets every non-zero pixel, ignored ones too
    ignored_bits = _bit_rows(truth == ignore_index) if truth.size and truth.max() > 1 else None
    if ignored_bits is not None:
        fg_bits &= ~ignored_bits  # == 1 only
    inter = _popcount(pred_bits[:, None] & fg_bits[None])  # (P, G)
    sizes = _popcount(np.concatenate([pred_bits, fg_bits]))  # (P + G,)
    pred_size, gt_size = sizes[:num_pred], sizes[num_pred:]
    pred_valid = pred_size[:, None]  # (P, 1) |pred & valid_g| when nothing is ignored
    if ignored_bits is not None and ignored_bits.any():
        pred_valid = pred_valid - _popcount(pred_bits[:, None] & ignored_bits[None])  # (P, G)
    return inter, pred_valid + gt_size[None] - inter, pred_size, gt_size


def pairwise_counts(
    preds: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[PairwiseCounts]:
    """I and U of every prediction against every ground truth of every question of a batch.

    Exact integer counts from bit-packed masks: one AND and one popcount over (P, G, words) per
    question, no per-pair or per-pixel Python loop.

    Args:
        preds: B tensors (P_b, H_b, W_b) bool.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}; ignored pixels count in
            neither I nor U of that ground truth.
        ignore_index: 2-255 (ground truth is compared as uint8).
    """
    _check_batch(preds, targets, ignore_index)
    return [
        PairwiseCounts(*(torch.from_numpy(a) for a in _question_counts(pred, truth, ignore_index)))
        for pred, truth in zip(preds, targets, strict=True)
    ]


def _check_batch(preds: list[Tensor], targets: list[Tensor], ignore_index: int) -> None:
    if not 2 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be 2-255 (0 and 1 are mask values), got {ignore_index}")
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction sets but {len(targets)} ground-truth sets")
    for b, (pred, truth) in enumerate(zip(preds, targets, strict=True)):
        if pred.shape[1:] != truth.shape[1:]:
            raise ValueError(
                f"question {b}: predictions {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in size"
            )


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


def hungarian_pairs(
    cost: np.ndarray, inter: np.ndarray, union: np.ndarray, pred_size: np.ndarray, gt_size: np.ndarray
) -> MatchedPairs:
    """The minimum-cost one-to-one assignment, completed with empty-mask pairs (see module doc).

    Args:
        cost: (P, G) cost of pairing prediction p with ground truth g.
        inter, union: (P, G) pixel counts; pred_size: (P,) |pred|; gt_size: (G,) |truth|.
    """
    num_pred, num_gt = inter.shape
    rows, cols = linear_sum_assignment(cost)  # rows ascending
    pred_index, gt_index = rows.astype(np.int64), cols.astype(np.int64)
    intersection, union = inter[rows, cols], union[rows, cols]
    if num_pred != num_gt:  # the lone masks of the larger side, each against an empty mask
        lone_pred = np.array(sorted(set(range(num_pred)) - set(rows.tolist())), dtype=np.int64)
        lone_gt = np.array(sorted(set(range(num_gt)) - set(cols.tolist())), dtype=np.int64)
        empty = np.full(len(lone_pred) + len(lone_gt), -1)
        pred_index = np.concatenate([pred_index, lone_pred, empty[: len(lone_gt)]])
        gt_index = np.concatenate([gt_index, empty[: len(lone_pred)], lone_gt])
        intersection = np.concatenate([intersection, np.zeros(len(empty))])
        union = np.concatenate([union, pred_size[lone_pred], gt_size[lone_gt]])
    return MatchedPairs(
        torch.from_numpy(pred_index), torch.from_numpy(gt_index), torch.from_numpy(intersection),
        torch.from_numpy(union), num_gt,
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
    _check_batch(logits, targets, ignore_index)
    pairs = []
    for x, truth in zip(logits, targets, strict=True):
        counts = _question_counts(x if x.dtype == torch.bool else x > 0, truth, ignore_index)
        inter, union = counts[0], counts[1]
        if cost == "iou":
            matrix = 1 - np.where(union == 0, 1.0, inter / (union + 1e-5))  # 1 - mask_iou, in float64
        elif x.dtype == torch.bool:
            raise ValueError("the 'bce_dice' matching cost needs mask logits, got bool masks")
        else:
            matrix = bce_dice_cost(x, truth, ignore_index).detach().cpu().numpy()
        pairs.append(hungarian_pairs(matrix, *counts))
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
