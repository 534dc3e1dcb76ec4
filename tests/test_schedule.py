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


def test_a_resumed_schedule_keeps_its_own_length_and_the_saved_step():
    """Resuming a 20-step run with 60 steps: step 20 continues the decay over 60, not at 0."""
    def schedule(total: int) -> tuple[torch.optim.Optimizer, WarmupLinearLR]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, WarmupLinearLR(optimizer, warmup_steps=10, total_steps=total)

    optimizer, short = schedule(20)
    for _ in range(20):
        optimizer.step()
        short.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    saved = optimizer.state_dict()  # as Lightning restores: the optimizer first (its LR, 0), then the schedule
    optimizer, longer = schedule(60)
    optimizer.load_state_dict(saved)
    longer.load_state_dict(short.state_dict())
    assert longer.last_epoch == 20 and longer.total_steps == 60
    assert optimizer.param_groups[0]["lr"] == pytest.approx((60 - 20) / (60 - 10)) == longer.get_last_lr()[0]
    optimizer.step()
    longer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((60 - 21) / (60 - 10))
