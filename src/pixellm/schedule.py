"""Learning-rate schedule of the release (LISA's recipe): linear warm-up, then linear decay to 0."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupLinearLR(LambdaLR):
    """LR factor ``(step + 1) / (warmup_steps + 1)`` during warm-up, then linear decay to 0 at ``total_steps``.

    A resumed run keeps the ``warmup_steps`` and ``total_steps`` it was configured with (for
    ``total_steps=None``: its own trainer's length) and takes only the step count from the
    checkpoint, so a run resumed with a larger ``max_steps`` decays over the new length instead of
    staying at 0 past the old one.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warm-up (official: 100).
        total_steps: optimizer steps of the whole run; ``None`` lets ``PixelLMTask`` fill in the
            trainer's ``estimated_stepping_batches`` before the first step.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps if self.total_steps is not None else step + 1
        remaining = max(total - step, 0)
        return remaining / max(total - self.warmup_steps, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        """The checkpoint's step count and base LRs; this run's ``warmup_steps`` and ``total_steps``, and so
        the LR of the next step from them (the optimizer's state, loaded before, holds the old run's)."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("warmup_steps", "total_steps")})
        if self.total_steps is None:  # PixelLMTask fills it in; the next step() applies it
            return
        self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr
