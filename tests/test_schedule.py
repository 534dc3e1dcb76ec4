"""The release's LR schedule: linear warm-up then linear decay to zero."""

import pytest
import torch

from pixellm.schedule import WarmupLinearLR


def test_warmup_then_linear_decay():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupLinearLR(optimizer, warmup_steps=100, total_steps=1100)
    assert schedule.factor(0) == pytest.approx(1 / 101)
    assert schedule.factor(99) == pytest.approx(100 / 101)
    assert schedule.factor(100) == pytest.approx(1.0)
    assert schedule.factor(600) == pytest.approx(0.5)
    assert schedule.factor(1100) == 0.0 and schedule.factor(5000) == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 / 101)
