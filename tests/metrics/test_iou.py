"""gIoU / cIoU on hand-made masks, judge weights, few/many groups, agreement with pycocotools."""

import math

import numpy as np
import pytest
import torch

from pixellm.metrics.iou import MaskIoU, PairedMaskIoU, intersection_union, mask_iou


def logits(mask: list[list[int]]) -> torch.Tensor:
    return torch.tensor(mask, dtype=torch.float) * 2 - 1  # on -> +1, off -> -1


def test_giou_and_ciou_hand_computed():
    metric = MaskIoU()
    # question 1: pred {(0,0),(0,1)} vs truth {(0,0)}: I=1 U=2 ; pred empty vs truth {(1,1)}: I=0 U=1
    pred1 = torch.stack([logits([[1, 1], [0, 0]]), logits([[0, 0], [0, 0]])])
    truth1 = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]])
    # question 2: empty vs empty -> IoU 1, adds nothing to I or U
    pred2 = logits([[0, 0], [0, 0]])[None]
    truth2 = torch.zeros(1, 2, 2, dtype=torch.long)
    metric.update([pred1, pred2], [truth1, truth2])
    scores = metric.compute()
    assert scores["gIoU"].item() == pytest.approx((1 / (2 + 1e-5) + 0 + 1) / 3, rel=1e-6)
    assert scores["cIoU"].item() == pytest.approx(1 / 3, rel=1e-6)


def test_ignore_pixels_count_nowhere():
    metric = MaskIoU()
    truth = torch.tensor([[[1, 255], [0, 0]]])
    metric.update([logits([[1, 1], [0, 0]])[None]], [truth])
    assert metric.compute()["cIoU"].item() == pytest.approx(1.0)


def test_empty_prediction_and_extra_prediction_after_matching_hand_computed():
    from pixellm.evaluation.matching import concatenate, match_batch

    # question 1 (G=1): predictions {(0,0)} and an extra {(1,1)}; truth {(0,0),(0,1)}
    # -> matched I=1 U=2, the extra pairs with an empty truth: I=0 U=1. Score normalised by max(2, 1).
    pred1 = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)
    truth1 = torch.tensor([[[1, 1], [0, 0]]])
    # question 2 (G=1): no prediction; truth {(1,0)} pairs with an empty prediction: I=0 U=1
    pred2 = torch.zeros(0, 2, 2, dtype=torch.bool)
    truth2 = torch.tensor([[[0, 0], [1, 0]]])
    # question 3 (G=1): an empty prediction on an empty truth: IoU 1, nothing in I or U
    pred3 = torch.zeros(1, 2, 2, dtype=torch.bool)
    truth3 = torch.zeros(1, 2, 2, dtype=torch.long)
    metric = PairedMaskIoU()
    metric.update(*concatenate(match_batch([pred1, pred2, pred3], [truth1, truth2, truth3])))
    scores = metric.compute()
    assert scores["gIoU"].item() == pytest.approx((1 / (2 + 1e-5) + 0 + 0 + 1) / 4, rel=1e-6)
    assert scores["cIoU"].item() == pytest.approx(1 / 4, rel=1e-6)
    assert scores["few_gIoU"].item() == scores["gIoU"].item()
    assert math.isnan(scores["many_gIoU"].item()) and math.isnan(scores["many_cIoU"].item())


def test_judge_scores_weight_iou_and_intersection():
    metric = PairedMaskIoU()
    inter, union = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 3.0])
    metric.update(inter, union, torch.tensor([1, 1]), score=torch.tensor([0.5, 0.0]))
    scores = metric.compute()
    assert scores["gIoU"].item() == pytest.approx((0.5 * 2 / (4 + 1e-5) + 0) / 2, rel=1e-6)
    assert scores["cIoU"].item() == pytest.approx(0.5 * 2 / 7, rel=1e-6)


def test_few_and_many_groups_split_at_three_targets():
    metric = MaskIoU()
    few = torch.ones(3, 1, 2)  # 3 targets, all right -> IoU ~1
    many_pred = torch.cat([torch.ones(2, 1, 2), -torch.ones(2, 1, 2)])  # 4 targets, 2 right, 2 missed
    metric.update([few, many_pred], [torch.ones(3, 1, 2, dtype=torch.long), torch.ones(4, 1, 2, dtype=torch.long)])
    scores = metric.compute()
    assert scores["few_cIoU"].item() == pytest.approx(1.0)
    assert scores["many_cIoU"].item() == pytest.approx(0.5)
    assert scores["cIoU"].item() == pytest.approx(10 / 14)
    assert scores["many_gIoU"].item() == pytest.approx(2 * (2 / (2 + 1e-5)) / 4, rel=1e-6)  # two IoUs of ~1 over 4 masks


def test_iou_agrees_with_pycocotools_on_200_random_pairs():
    from pycocotools import mask as mask_utils

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = torch.randint(16, 64, (2,), generator=generator).tolist()
        density = 0.05 + 0.9 * torch.rand(2, generator=generator)  # unions of > 10 pixels: 1e-5 / U < 1e-6
        pred = torch.rand(1, h, w, generator=generator) < density[0]
        truth = (torch.rand(1, h, w, generator=generator) < density[1]).long()
        inter, union = intersection_union(pred, truth)
        encode = [mask_utils.encode(np.asfortranarray(m[0].numpy().astype(np.uint8))) for m in (pred, truth)]
        expected = mask_utils.iou([encode[0]], [encode[1]], [0])[0, 0]
        assert union.item() > 10
        assert mask_iou(inter, union).item() == pytest.approx(expected, abs=1e-6)


def test_readme_states_the_metric_definitions_of_the_docstring():
    from pathlib import Path

    import pixellm.metrics.iou as iou_module

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bullets = [line for line in iou_module.__doc__.splitlines() if line.startswith("- ")]
    assert len(bullets) == 4
    for line in bullets:
        assert line in readme, line
