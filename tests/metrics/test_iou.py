"""gIoU / cIoU on hand-made masks."""

import pytest
import torch

from pixellm.metrics.iou import MaskIoU


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
