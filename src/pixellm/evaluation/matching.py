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
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pixellm.metrics.iou import intersection_union, mask_iou

MatchCost = Literal["iou", "bce_dice"]
MATCH_COSTS = ("iou", "bce_dice")
WORST_COST = 1e9  # the "bce_dice" cost of a pair whose prediction holds a non-finite logit


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


def _flat_numpy(masks: Tensor, dtype: torch.dtype) -> np.ndarray:
    """(K, H, W) tensor as a (K, H * W) CPU array of ``dtype``, without a copy where it already is one."""
    if masks.dtype != dtype or masks.requires_grad or not masks.is_cpu:
        masks = masks.detach().to("cpu", dtype)
    array = masks.numpy()
    return array.reshape(len(array), array[0].size if len(array) else math.prod(array.shape[1:]))


class _BitMasks(NamedTuple):
    """One question's masks, bit-packed (64 pixels per uint64 word, W words per mask)."""

    pred: np.ndarray  # (P, W) the predictions
    truth: np.ndarray  # (G, W) the ground-truth pixels equal to 1
    ignored: np.ndarray  # (G, W) the ground-truth pixels equal to ignore_index; (1, W) where the G rows are
    # the same (an image's void pixels), (0, W) where there are none


def _pack(pred: Tensor, truth: Tensor, ignore_index: int) -> _BitMasks:
    """Bit-packs a question's (P, H, W) bool predictions and (G, H, W) ground truth, each mask read once
    (twice, plus a comparison, for ground truth that holds values above 1)."""
    truth = _flat_numpy(truth, torch.uint8)  # (G, N) {0, 1, ignore}
    truth_bits = _bit_rows(truth)  # packbits sets every non-zero pixel, ignored ones too
    ignored = truth_bits[:0]
    if truth.size and truth.max() > 1:
        ignored = _bit_rows(truth == ignore_index)
        truth_bits ^= ignored  # == 1 only (ignored pixels are among the non-zero ones)
        if not ignored.any():
            ignored = ignored[:0]
        elif (ignored[1:] == ignored[0]).all():
            ignored = ignored[:1]
    return _BitMasks(_bit_rows(_flat_numpy(pred, torch.bool)), truth_bits, ignored)


def _starts(sizes: np.ndarray) -> np.ndarray:
    """(B,) sizes -> (B + 1,) offsets of consecutive blocks of those sizes."""
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass(frozen=True)
class _BatchCounts:
    """Pixel counts of every (prediction, ground truth) pair of B questions, flat.

    Question b's pairs are ``pair_start[b]:pair_start[b + 1]`` of ``intersection`` and ``union``,
    row-major over its (P_b, G_b) matrix; its predictions are ``pred_start[b]:pred_start[b + 1]``
    of ``pred_size`` and its ground truths ``gt_start[b]:gt_start[b + 1]`` of ``gt_size``.
    """

    num_pred: np.ndarray  # (B,) P_b
    num_gt: np.ndarray  # (B,) G_b
    pair_start: np.ndarray  # (B + 1,)
    pred_start: np.ndarray  # (B + 1,)
    gt_start: np.ndarray  # (B + 1,)
    intersection: np.ndarray  # (sum P_b G_b,) float64
    union: np.ndarray  # (sum P_b G_b,) float64
    pred_size: np.ndarray  # (sum P_b,) float64 |pred|
    gt_size: np.ndarray  # (sum G_b,) float64 |truth|

    def matrix(self, flat: np.ndarray, b: int) -> np.ndarray:
        """Question b's (P_b, G_b) view of a (pairs,) array laid out as ``intersection``."""
        return flat[self.pair_start[b] : self.pair_start[b + 1]].reshape(self.num_pred[b], self.num_gt[b])

    def question(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(P, G) intersection and union, (P,) |pred| and (G,) |truth| of question b (views)."""
        return (
            self.matrix(self.intersection, b),
            self.matrix(self.union, b),
            self.pred_size[self.pred_start[b] : self.pred_start[b + 1]],
            self.gt_size[self.gt_start[b] : self.gt_start[b + 1]],
        )


def _batch_counts(preds: list[Tensor], targets: list[Tensor], ignore_index: int) -> _BatchCounts:
    """I and U of every pair of every question of a batch (``pairwise_counts``), flat.

    Per question: one broadcast AND of its (P, G, W) words, into a buffer reused across questions and
    small enough to stay in cache, and the set bits of every word of those pairs and of its masks,
    counted into one array for the batch. One ``reduceat`` then sums every row of words, and the
    unions and everything after are computed once for the batch.
    """
    _check_batch(preds, targets, ignore_index)
    questions = [_pack(pred, truth, ignore_index) for pred, truth in zip(preds, targets, strict=True)]
    num_pred = np.array([len(q.pred) for q in questions], dtype=np.int64)
    num_gt = np.array([len(q.truth) for q in questions], dtype=np.int64)
    words = np.array([q.pred.shape[1] for q in questions], dtype=np.int64)  # (B,) W_b
    ignored_rows = np.array([len(q.ignored) for q in questions], dtype=np.int64)  # (B,) 0, 1 or G_b
    num_pairs = num_pred * num_gt
    pred_start, gt_start, pair_start = _starts(num_pred), _starts(num_gt), _starts(num_pairs)
    # Question b's rows of W_b counts: its P G pairs, P predictions, G ground truths, then, where it
    # has ignored pixels, its predictions against them: P G rows, or P where all G ignore the same pixels.
    rows = num_pairs + num_pred * (1 + ignored_rows) + num_gt  # (B,)
    row_start, count_start = _starts(rows), _starts(rows * words)
    counted = np.empty(count_start[-1] + 1, np.uint8)  # set bits per word (<= 64); + 1: a start for empty rows
    counted[-1] = 0
    buffer = np.empty(max((q.pred.size * len(q.truth) for q in questions), default=0), np.uint64)
    for b, q in enumerate(questions):
        (p, w), g = q.pred.shape, len(q.truth)
        anded = buffer[: p * g * w].reshape(p, g, w)  # (P, G, W)
        pairs, preds, truths = count_start[b], count_start[b] + p * g * w, count_start[b] + (p * g + p) * w
        ignored = truths + g * w
        np.bitwise_count(np.bitwise_and(q.pred[:, None], q.truth[None], out=anded), out=counted[pairs:preds].reshape(p, g, w))
        np.bitwise_count(q.pred, out=counted[preds:truths].reshape(p, w))
        np.bitwise_count(q.truth, out=counted[truths:ignored].reshape(g, w))
        if len(q.ignored):
            anded = np.bitwise_and(q.pred[:, None], q.ignored[None], out=anded[:, : len(q.ignored)])
            np.bitwise_count(anded, out=counted[ignored : count_start[b + 1]].reshape(anded.shape))
    row_question, row_local = _members(rows, row_start)  # (R,) each row's question and index in it
    row_words = words[row_question]
    row_counts = count_start[row_question] + row_local * row_words
    sums = np.add.reduceat(counted, row_counts, dtype=np.uint32)  # (R,) set bits per row
    sums[row_words == 0] = 0  # rows of masks without pixels: reduceat took a single count there
    question, local = _members(num_pairs, pair_start)  # (pairs,) each pair's question and index in it
    inter = sums[row_start[question] + local].astype(np.float64)  # exact: uint32 counts
    pred_question, pred_local = _members(num_pred, pred_start)
    pred_size = sums[row_start[pred_question] + num_pairs[pred_question] + pred_local].astype(np.float64)
    gt_question, gt_local = _members(num_gt, gt_start)
    gt_size = sums[row_start[gt_question] + num_pairs[gt_question] + num_pred[gt_question] + gt_local].astype(np.float64)
    gt_count = np.maximum(num_gt[question], 1)  # never 0 where a pair exists
    pred_index, gt_index = local // gt_count, local % gt_count  # (pairs,) in the question
    pair_pred, pair_gt = pred_start[question] + pred_index, gt_start[question] + gt_index
    ignored_overlap = np.zeros(pair_start[-1])  # (pairs,) |pred & ignored_g|, outside the valid pixels of g
    pair_ignored_rows = ignored_rows[question]
    with_ignored = pair_ignored_rows > 0
    first_ignored = row_start[question] + num_pairs[question] + num_pred[question] + num_gt[question]
    ignored_row = first_ignored + pred_index * pair_ignored_rows + np.minimum(gt_index, pair_ignored_rows - 1)
    ignored_overlap[with_ignored] = sums[ignored_row[with_ignored]]
    union = pred_size[pair_pred] - ignored_overlap + gt_size[pair_gt] - inter
    return _BatchCounts(num_pred, num_gt, pair_start, pred_start, gt_start, inter, union, pred_size, gt_size)


def _members(sizes: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For blocks of ``sizes`` laid out from ``start``: each element's block and index within it."""
    block = np.repeat(np.arange(len(sizes)), sizes)
    return block, np.arange(start[-1]) - start[block]


def pairwise_counts(
    preds: list[Tensor], targets: list[Tensor], ignore_index: int = 255
) -> list[PairwiseCounts]:
    """I and U of every prediction against every ground truth of every question of a batch.

    Exact integer counts from bit-packed masks: one AND and one popcount over the (P, G, words)
    of each question, no per-pair or per-pixel Python loop.

    Args:
        preds: B tensors (P_b, H_b, W_b) bool.
        targets: B tensors (G_b, H_b, W_b) in {0, 1, ignore_index}; ignored pixels count in
            neither I nor U of that ground truth.
        ignore_index: 2-255 (ground truth is compared as uint8).
    """
    counts = _batch_counts(preds, targets, ignore_index)
    return [PairwiseCounts(*(torch.from_numpy(a) for a in counts.question(b))) for b in range(len(preds))]


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


def _lone(taken: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows not in ``taken`` (bool, over the questions' rows laid out by ``start``): each one's
    flat row, question and index within its question, ascending."""
    rows = np.flatnonzero(~taken)
    question = np.searchsorted(start, rows, side="right") - 1
    return rows, question, rows - start[question]


def _assign(counts: _BatchCounts, costs: list[np.ndarray]) -> list[MatchedPairs]:
    """Each question's minimum-cost one-to-one assignment, completed with empty-mask pairs (module doc).

    Only the assignment itself runs per question; the lone masks and the pair order are found for
    the whole batch at once.

    Args:
        counts: the pixel counts of B questions.
        costs: B (P_b, G_b) arrays, the cost of pairing prediction p with ground truth g.
    """
    assignments = [linear_sum_assignment(cost) for cost in costs]  # (rows ascending, cols) each
    matched = np.array([len(rows) for rows, _ in assignments], dtype=np.int64)  # (B,) min(P_b, G_b)
    question = np.repeat(np.arange(len(costs)), matched)  # (matched pairs,)
    rows = np.concatenate([rows for rows, _ in assignments] or [np.zeros(0, np.int64)]).astype(np.int64)
    cols = np.concatenate([cols for _, cols in assignments] or [np.zeros(0, np.int64)]).astype(np.int64)
    pred_taken, gt_taken = np.zeros(counts.pred_start[-1], bool), np.zeros(counts.gt_start[-1], bool)
    pred_taken[counts.pred_start[question] + rows] = True
    gt_taken[counts.gt_start[question] + cols] = True
    lone_pred, lone_pred_question, lone_pred_index = _lone(pred_taken, counts.pred_start)
    lone_gt, lone_gt_question, lone_gt_index = _lone(gt_taken, counts.gt_start)
    # Every pair reads its (I, U) from one table: the (P, G) pairs of all questions, then each
    # prediction and each ground truth against an empty mask.
    num_pairs, num_preds = counts.pair_start[-1], counts.pred_start[-1]
    inter_table = np.concatenate([counts.intersection, np.zeros(num_preds + counts.gt_start[-1])])
    union_table = np.concatenate([counts.union, counts.pred_size, counts.gt_size])
    entry = np.concatenate([
        counts.pair_start[question] + rows * counts.num_gt[question] + cols,
        num_pairs + lone_pred,
        num_pairs + num_preds + lone_gt,
    ])
    empty_pred, empty_gt = np.full(len(lone_gt), -1), np.full(len(lone_pred), -1)  # the other side of lone pairs
    pair_question = np.concatenate([question, lone_pred_question, lone_gt_question])
    section = np.repeat([0, 1, 2], [len(question), len(lone_pred), len(lone_gt)])
    order = np.lexsort((section, pair_question))  # per question: matched, lone predictions, lone truths
    fields = (
        np.concatenate([rows, lone_pred_index, empty_pred])[order],
        np.concatenate([cols, empty_gt, lone_gt_index])[order],
        inter_table[entry[order]],
        union_table[entry[order]],
    )
    lengths = np.bincount(pair_question, minlength=len(costs)).tolist()
    split = [torch.from_numpy(field).split(lengths) for field in fields]  # one view per question
    return [MatchedPairs(*pairs, int(g)) for *pairs, g in zip(*split, counts.num_gt, strict=True)]


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
    if cost == "bce_dice" and any(x.dtype == torch.bool for x in logits):
        raise ValueError("the 'bce_dice' matching cost needs mask logits, got bool masks")
    counts = _batch_counts([x if x.dtype == torch.bool else x > 0 for x in logits], targets, ignore_index)
    if cost == "iou":
        inter, union = counts.intersection, counts.union
        flat = 1 - np.where(union == 0, 1.0, inter / (union + 1e-5))  # (pairs,) 1 - mask_iou, in float64
        costs = [counts.matrix(flat, b) for b in range(len(logits))]
    else:
        costs = [
            np.nan_to_num(bce_dice_cost(x, truth, ignore_index).detach().cpu().numpy(), nan=WORST_COST, posinf=WORST_COST)
            for x, truth in zip(logits, targets, strict=True)
        ]  # a pair with a non-finite logit costs the most (scipy refuses NaN); its I and U still count
    return _assign(counts, costs)


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
    lengths = torch.tensor([len(p.intersection) for p in pairs])
    counts = torch.tensor([p.num_targets for p in pairs]).repeat_interleave(lengths)  # (M,)
    return torch.cat([p.intersection for p in pairs]), torch.cat([p.union for p in pairs]), counts
