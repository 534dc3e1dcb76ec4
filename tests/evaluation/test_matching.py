"""Hungarian matching of predicted to ground-truth masks: optimum, empty pairs, batching."""

import pytest
import torch

from pixellm.evaluation.matching import (
    bce_dice_cost,
    concatenate,
    match_batch,
    pairwise_counts,
    text_order_pairs,
)
from pixellm.metrics.iou import intersection_union


def row_masks(rows: list[list[int]], width: int = 8) -> torch.Tensor:
    """(K, 1, width) masks, mask k on the columns listed in rows[k]."""
    out = torch.zeros(len(rows), 1, width, dtype=torch.bool)
    for k, cols in enumerate(rows):
        out[k, 0, cols] = True
    return out


def test_matching_finds_the_optimum_where_greedy_is_wrong():
    # IoU matrix: p0-g0 = 3/4, p0-g1 = 2/3, p1-g0 = 1/2, p1-g1 = 0.
    # Greedy takes p0-g0 first (0.75) and leaves p1-g1 (0): sum 0.75.
    # The optimum is p0-g1 + p1-g0 = 2/3 + 1/2 = 1.1667.
    preds = row_masks([[0, 1, 2, 3], [0, 1]])
    truth = row_masks([[0, 1, 2], [1, 2, 3]]).long()
    (pairs,) = match_batch([preds], [truth])
    assert pairs.pred_index.tolist() == [0, 1]
    assert pairs.gt_index.tolist() == [1, 0]
    assert pairs.intersection.tolist() == [3.0, 2.0]
    assert pairs.union.tolist() == [4.0, 3.0]
    assert pairs.iou().sum().item() == pytest.approx(3 / 4 + 2 / 3, rel=1e-4)


def test_unmatched_predictions_and_ground_truths_pair_with_empty_masks():
    preds = row_masks([[0, 1], [5, 6, 7], [4]])  # three predictions
    truth = row_masks([[5, 6]]).long()  # one target
    (pairs,) = match_batch([preds], [truth])
    assert pairs.pred_index.tolist() == [1, 0, 2]  # the matched pair first, then lone predictions
    assert pairs.gt_index.tolist() == [0, -1, -1]
    assert pairs.intersection.tolist() == [2.0, 0.0, 0.0]
    assert pairs.union.tolist() == [3.0, 2.0, 1.0]  # lone prediction: U = |pred|
    assert pairs.num_targets == 1
    assert pairs.gt_of_prediction(3) == [None, 0, None]
    (missing,) = match_batch([row_masks([])], [truth])  # no prediction at all
    assert missing.pred_index.tolist() == [-1] and missing.gt_index.tolist() == [0]
    assert missing.intersection.tolist() == [0.0] and missing.union.tolist() == [2.0]


def test_batched_counts_equal_per_pair_counts_with_sizes_and_ignore_pixels():
    generator = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for count_p, count_g, h, w in [(3, 2, 5, 7), (1, 4, 9, 4), (0, 2, 3, 3), (2, 0, 4, 4)]:
        preds.append(torch.rand(count_p, h, w, generator=generator) > 0.5)
        truth = (torch.rand(count_g, h, w, generator=generator) > 0.5).long()
        truth[torch.rand(count_g, h, w, generator=generator) > 0.8] = 255
        targets.append(truth)
    for pred, truth, counts in zip(preds, targets, pairwise_counts(preds, targets), strict=True):
        assert counts.intersection.shape == (pred.shape[0], truth.shape[0])
        for p in range(pred.shape[0]):
            for g in range(truth.shape[0]):
                inter, union = intersection_union(pred[p : p + 1], truth[g : g + 1])
                assert counts.intersection[p, g].item() == inter.item()
                assert counts.union[p, g].item() == union.item()
        assert counts.pred_size.tolist() == pred.flatten(1).sum(1).double().tolist()
        assert counts.gt_size.tolist() == (truth == 1).flatten(1).sum(1).double().tolist()


def test_bce_dice_cost_prefers_the_overlapping_target_and_matches_its_formula():
    logits = torch.tensor([[[4.0, 4.0, -4.0, -4.0]]])  # (1, 1, 4)
    truth = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 1, 1]]])  # (2, 1, 4)
    cost = bce_dice_cost(logits, truth)
    assert cost.shape == (1, 2) and cost[0, 0] < cost[0, 1]
    p = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64))
    bce_good = -torch.log(p)  # every pixel right with confidence p
    dice_good = 1 - (2 * 2 * p + 1) / (2 * p + 2 * (1 - p) + 2 + 1)  # sum(prob) + sum(truth) + 1
    assert cost[0, 0].item() == pytest.approx((bce_good + dice_good).item(), rel=1e-9)
    (pairs,) = match_batch([torch.cat([-logits, logits])], [truth], cost="bce_dice")
    assert pairs.gt_index.tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs mask logits"):
        match_batch([logits > 0], [truth], cost="bce_dice")
    broken = torch.cat([-logits, logits])
    broken[1, 0, 3] = float("nan")  # one NaN pixel: prediction 1 costs the most everywhere, not an error
    (pairs,) = match_batch([broken], [truth], cost="bce_dice")
    assert pairs.gt_index.tolist() == [1, 0] and pairs.intersection.tolist() == [2.0, 2.0]


def test_text_order_pairs_and_concatenate():
    logits = [torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]]), torch.tensor([[[1.0, 1.0]]])]
    truth = [torch.tensor([[[1, 1]], [[0, 1]]]), torch.tensor([[[0, 1]]])]
    pairs = text_order_pairs(logits, truth)
    inter, union, counts = concatenate(pairs)
    assert inter.tolist() == [1.0, 1.0, 1.0] and union.tolist() == [2.0, 1.0, 2.0]
    assert counts.tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="question 0: 2 predictions but 1"):
        text_order_pairs(logits[:1], [truth[1]])


def test_ignore_index_must_not_be_a_mask_value():
    with pytest.raises(ValueError, match="ignore_index must be 2-255"):
        match_batch([row_masks([[0]])], [row_masks([[0]]).long()], ignore_index=1)


def test_a_batch_of_mixed_mask_sizes_matches_question_by_question():
    # Questions of two sizes (1 and 25 words per mask) interleaved, with empty prediction and
    # ground-truth sets and ignored pixels, shared by all targets or not: the batch is counted into one set of flat arrays, and
    # every question must come back in its place with the pairs it gets alone.
    generator = torch.Generator().manual_seed(1)
    preds, targets = [], []
    for count_p, count_g, side in [(3, 2, 40), (2, 3, 5), (0, 2, 40), (4, 4, 5), (2, 0, 40), (1, 1, 40)]:
        preds.append(torch.rand(count_p, side, side, generator=generator) > 0.6)
        truth = (torch.rand(count_g, side, side, generator=generator) > 0.6).long()
        truth[:, :, :2] = 255  # the same ignored pixels in every target (counted once)...
        if side == 5:
            truth[:1, -1, -1] = 255  # ...except in the small questions: one target ignores one more
        targets.append(truth)
    batch = match_batch(preds, targets)
    alone = [match_batch([pred], [truth])[0] for pred, truth in zip(preds, targets, strict=True)]
    assert [p.num_targets for p in batch] == [2, 3, 2, 4, 0, 1]
    for together, single, pred, truth in zip(batch, alone, preds, targets, strict=True):
        assert together.pred_index.tolist() == single.pred_index.tolist()
        assert together.gt_index.tolist() == single.gt_index.tolist()
        assert together.union.tolist() == single.union.tolist()
        for p, g, inter, union in zip(together.pred_index.tolist(), together.gt_index.tolist(),
                                      together.intersection.tolist(), together.union.tolist(), strict=True):
            size = truth.shape[1:]
            mask = pred[p : p + 1] if p >= 0 else torch.zeros(1, *size, dtype=torch.bool)  # -1: empty
            target = truth[g : g + 1] if g >= 0 else torch.zeros(1, *size, dtype=torch.long)
            expected = intersection_union(mask, target)
            assert (inter, union) == (expected[0].item(), expected[1].item())
