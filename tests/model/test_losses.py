"""Loss stack values on a hand-made 2-target 2x2 example (Sec. 3.2)."""

import math

import pytest
import torch

from pixellm.model.losses import PixelLMLoss, dice_per_mask, overlap_weights

LOGITS = torch.tensor([[[2.0, -1.0], [0.5, -3.0]], [[1.0, 1.0], [-2.0, -0.5]]])  # (K=2, 2, 2)
TARGETS = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])


def bce(x: float, t: float) -> float:
    return math.log(1 + math.exp(x)) - x * t


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def flat(t: torch.Tensor) -> list[list[float]]:
    return [m.flatten().tolist() for m in t]


def test_overlap_map_marks_pixels_where_two_masks_are_on():
    # mask 0 on at (0,0),(1,0); mask 1 on at (0,0),(0,1): only (0,0) has two
    assert overlap_weights(LOGITS, alpha=2.0).tolist() == [[2.0, 1.0], [1.0, 1.0]]


def test_refinement_loss_equals_hand_computed_value():
    alpha = 3.0
    loss = PixelLMLoss(ce_weight=0, bce_weight=0, dice_weight=0, refinement_weight=1.0, alpha=alpha)
    weights = [alpha, 1, 1, 1]  # A over the 4 pixels, row-major
    total = sum(
        w * bce(x, t)
        for xs, ts in zip(flat(LOGITS), flat(TARGETS), strict=False)
        for w, x, t in zip(weights, xs, ts, strict=False)
    )
    expected = total / (2 * 2 * 2)  # 1 / (K H W)
    terms = loss(torch.tensor(0.0), [LOGITS], [TARGETS])
    assert terms["refinement"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_alpha_one_refinement_is_plain_bce():
    loss = PixelLMLoss(ce_weight=0, bce_weight=1.0, dice_weight=0, refinement_weight=1.0, alpha=1.0)
    terms = loss(torch.tensor(0.0), [LOGITS], [TARGETS])
    assert terms["refinement"].item() == pytest.approx(terms["bce"].item(), rel=1e-6)


def test_dice_of_a_perfect_prediction_is_near_zero():
    # the release divides p (not p * t) by the scale: a scale that also divided t would leave the
    # loss stuck near 1 whatever the prediction
    logits = torch.tensor([[[20.0, -20.0], [20.0, -20.0]]])
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    valid = torch.ones_like(targets, dtype=torch.bool)
    assert dice_per_mask(logits, targets, valid).item() == pytest.approx(0.0, abs=1e-3)
    assert dice_per_mask(-logits, targets, valid).item() == pytest.approx(1.0, abs=1e-3)


def test_dice_equals_hand_computed_value():
    scale, eps = 1000.0, 1e-6
    expected = []
    for xs, ts in zip(flat(LOGITS), flat(TARGETS), strict=False):
        p = [sigmoid(x) for x in xs]
        num = 2 * sum(a * b for a, b in zip(p, ts, strict=False)) / scale
        expected.append(1 - (num + eps) / (sum(p) / scale + sum(ts) / scale + eps))
    got = dice_per_mask(LOGITS, TARGETS, torch.ones_like(TARGETS, dtype=torch.bool), scale, eps)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    loss = PixelLMLoss(ce_weight=0, bce_weight=0, dice_weight=1.0, refinement_weight=0)
    assert loss(torch.tensor(0.0), [LOGITS], [TARGETS])["dice"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_weighted_sum_and_switched_off_terms():
    loss = PixelLMLoss(ce_weight=1.0, bce_weight=2.0, dice_weight=0.5, refinement_weight=0.0)
    terms = loss(torch.tensor(0.7), [LOGITS], [TARGETS])
    assert "refinement" not in terms
    expected = 0.7 + 2.0 * terms["bce"] + 0.5 * terms["dice"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ignore_pixels_are_left_out():
    targets = TARGETS.clone()
    targets[:, 1, 1] = 255
    loss = PixelLMLoss(ce_weight=0, bce_weight=1.0, dice_weight=0, refinement_weight=0)
    got = loss(torch.tensor(0.0), [LOGITS], [targets])["bce"].item()
    expected = sum(
        bce(x, t) for xs, ts in zip(flat(LOGITS), flat(TARGETS), strict=False) for x, t in list(zip(xs, ts, strict=False))[:3]
    ) / 6
    assert got == pytest.approx(expected, rel=1e-6)


def test_questions_without_targets_keep_the_graph():
    logits = torch.zeros(0, 4, 4, requires_grad=True)
    terms = PixelLMLoss()(torch.tensor(1.5, requires_grad=True), [logits], [torch.zeros(0, 4, 4)])
    assert terms["dice"].item() == 0.0 and terms["loss"].item() == pytest.approx(1.5)
    terms["loss"].backward()


def test_mismatched_counts_raise():
    with pytest.raises(ValueError, match="text order"):
        PixelLMLoss()(torch.tensor(0.0), [LOGITS], [TARGETS[:1]])


def test_overlap_weights_of_several_questions_at_once_are_each_questions_map():
    # question 0 = the two masks of LOGITS (overlap at (0,0)); question 1 = one mask, never overlapping
    single = torch.tensor([[[3.0, 3.0], [3.0, 3.0]]])
    owner = torch.tensor([0, 0, 1])
    weights = overlap_weights(torch.cat([LOGITS, single]), alpha=2.0, owner=owner)
    assert weights.tolist() == [[[2.0, 1.0], [1.0, 1.0]]] * 2 + [[[1.0, 1.0], [1.0, 1.0]]]


def test_batched_mask_terms_equal_the_per_question_terms_with_gradients():
    # questions of two sizes, one without masks, ignore pixels: one call == each question alone
    torch.manual_seed(0)
    shapes = [(2, 3, 4), (1, 3, 4), (0, 5, 5), (3, 5, 5), (1, 3, 4)]
    logits = [torch.randn(*s, requires_grad=True) for s in shapes]
    targets = [torch.randint(0, 2, s).float() for s in shapes]
    targets[0][0, 0, :2] = 255
    loss = PixelLMLoss(bce_weight=1.0, alpha=3.0)
    batched = loss.mask_terms(logits, targets)
    grads = torch.autograd.grad(sum(batched.values()), logits, materialize_grads=True)
    per_question = [loss.mask_terms([x], [t]) for x, t in zip(logits, targets, strict=True) if x.shape[0]]
    counts = torch.tensor([float(s[0]) for s in shapes if s[0]])
    for name in ("bce", "dice", "refinement"):
        expected = sum(c * terms[name] for c, terms in zip(counts, per_question, strict=True)) / counts.sum()
        assert batched[name].item() == pytest.approx(expected.item(), rel=1e-6)
    expected = sum(sum(terms.values()) * c for c, terms in zip(counts, per_question, strict=True)) / counts.sum()
    for got, want in zip(grads, torch.autograd.grad(expected, logits, materialize_grads=True), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
