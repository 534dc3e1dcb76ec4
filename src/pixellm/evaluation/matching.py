"""Pairing predicted masks with ground-truth masks, one question at a time (Sec. 4.3).

Every function here is pure and deterministic, and vectorised over masks and pixels: the I and U
of every (prediction, ground truth) pair of a whole batch come from one operation over bit-packed
masks, and each question's assignment from ``scipy.optimize.linear_sum_assignment``.

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


def _packed_rows(masks: np.ndarray, words: int) -> np.ndarray:
    """(K, N) bool/uint8 masks (non-zero = on) as (K, words) uint64 bit rows, zero-padded."""
    bits = np.packbits(masks, axis=1)  # (K, ceil(N / 8)) uint8
    padded = np.zeros((masks.shape[0], words * 8), dtype=np.uint8)
    padded[:, : bits.shape[1]] = bits
    return padded.view(np.uint64)


def _popcount(rows: np.ndarray) -> np.ndarray:
    """(R, W) uint64 -> (R,) float64 count of set bits per row."""
    return np.bitwise_count(rows).sum(1, dtype=np.int64).astype(np.float64)


def pairwise_counts(
    preds: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[PairwiseCounts]:
    """I and U of every prediction against every ground truth of every question of a batch.

    Each mask is bit-packed once (64 pixels per word; zero padding adds 0 to every count), then
    the counts of all (prediction, ground truth) pairs of the whole batch come from one AND and
    one popcount over a (pairs, words) array: exact integer counts, no per-pair or per-pixel
    Python loop.

    Args:
        preds: B tensors (P_b, H_b, W_b) bool.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}; ignored pixels count in
            neither I nor U of that ground truth.
        ignore_index: 0-255 (ground truth is compared as uint8).
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction sets but {len(targets)} ground-truth sets")
    for b, (pred, truth) in enumerate(zip(preds, targets, strict=True)):
        if pred.shape[1:] != truth.shape[1:]:
            raise ValueError(
                f"question {b}: predictions {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in size"
            )
    if not preds:
        return []
    words = max(-(-t.shape[1] * t.shape[2] // 64) for t in targets)
    pred_rows, fg_rows, valid_rows = [], [], []
    for pred, truth in zip(preds, targets, strict=True):
        truth = truth.detach().cpu().flatten(1).to(torch.uint8).numpy()  # (G, N) {0, 1, ignore}
        pred_rows.append(_packed_rows(pred.detach().cpu().flatten(1).numpy(), words))
        valid = _packed_rows(truth != ignore_index, words)  # (G, words)
        valid_rows.append(valid)
        fg_rows.append(_packed_rows(truth, words) & valid)  # non-zero and not ignored: == 1
    pred_bits, fg_bits, valid_bits = (np.concatenate(r) for r in (pred_rows, fg_rows, valid_rows))
    num_pred = [p.shape[0] for p in preds]
    num_gt = [t.shape[0] for t in targets]
    pred_start, gt_start = np.cumsum([0, *num_pred]), np.cumsum([0, *num_gt])
    pred_of_pair = np.concatenate(  # (M,) every (p, g) of every question, p-major
        [np.repeat(np.arange(p) + pred_start[b], g) for b, (p, g) in enumerate(zip(num_pred, num_gt, strict=True))]
    ).astype(np.int64)
    gt_of_pair = np.concatenate(
        [np.tile(np.arange(g) + gt_start[b], p) for b, (p, g) in enumerate(zip(num_pred, num_gt, strict=True))]
    ).astype(np.int64)
    paired = pred_bits[pred_of_pair]  # (M, words)
    inter = _popcount(paired & fg_bits[gt_of_pair])  # (M,)
    pred_valid = _popcount(paired & valid_bits[gt_of_pair])  # (M,) |pred & valid_g|
    pred_size, gt_size = _popcount(pred_bits), _popcount(fg_bits)  # (sum P,), (sum G,)
    union = pred_valid + gt_size[gt_of_pair] - inter
    counts, pair_start = [], 0
    for b, (p, g) in enumerate(zip(num_pred, num_gt, strict=True)):
        span = slice(pair_start, pair_start + p * g)
        pair_start += p * g
        counts.append(
            PairwiseCounts(
                torch.from_numpy(inter[span].reshape(p, g)),
                torch.from_numpy(union[span].reshape(p, g)),
                torch.from_numpy(pred_size[pred_start[b] : pred_start[b + 1]]),
                torch.from_numpy(gt_size[gt_start[b] : gt_start[b + 1]]),
            )
        )
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
