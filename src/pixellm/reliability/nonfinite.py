"""Training steps whose loss is NaN or infinite: skipped, counted, and fatal past a limit."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """More training losses were NaN/Inf than ``NonFiniteLossGuard.max_skipped_steps`` allows."""


class NonFiniteLossGuard:
    """Decides whether a training step is skipped because its loss is not finite.

    The task then returns ``skipped_step_loss(self)`` from ``training_step`` (see there).

    Args:
        max_skipped_steps: The run stops with ``NonFiniteLossError`` at the next non-finite loss
            after this many were skipped; 0 stops at the first.
    """

    def __init__(self, max_skipped_steps: int = 10) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0

    def should_skip(
        self, loss: Tensor, step: int, any_rank: Callable[[bool], bool] | None = None
    ) -> bool:
        """``True`` (and counted, with a warning) when ``loss`` is NaN or infinite.

        Args:
            loss: The scalar training loss.
            step: The global step, quoted in the warning and the error.
            any_rank: With several processes, turns this rank's "not finite" into "not finite on
                any rank" (e.g. ``strategy.reduce_boolean_decision(bad, all=False)``), so every
                rank skips the same steps, keeps the same count and stops at the same step instead
                of leaving the others waiting in a collective.

        Raises:
            NonFiniteLossError: When this would be skipped step ``max_skipped_steps + 1``.
        """
        bad = not bool(torch.isfinite(loss).all())
        if any_rank is not None:
            bad = any_rank(bad)
        if not bad:
            return False
        if self.skipped >= self.max_skipped_steps:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {step}, after {self.skipped} skipped "
                f"non-finite steps (limit model.init_args.max_nonfinite_steps="
                f"{self.max_skipped_steps}); lower the learning rate or check the data"
            )
        self.skipped += 1
        warnings.warn(
            f"training loss is {loss.item()} at step {step}: step skipped "
            f"({self.skipped} of at most {self.max_skipped_steps})",
            stacklevel=2,
        )
        return True


def skipped_step_loss(module: LightningModule) -> Tensor | None:
    """What ``training_step`` returns for a step it skips (non-finite loss, empty batch).

    On one device ``None``: Lightning then makes no backward pass and no update. With several
    processes ``None`` would leave the other ranks waiting in the gradient all-reduce, and
    Lightning's DeepSpeed precision refuses ``None`` even on one device, so there it is a zero loss
    over every trainable parameter instead: all gradients are 0 and every rank joins the all-reduce
    (the optimizer still applies its momentum for that step).
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None
    if trainer.world_size == 1 and not isinstance(trainer.strategy, DeepSpeedStrategy):
        return None
    return torch.stack([p.sum() for p in module.parameters() if p.requires_grad]).sum() * 0.0


def any_rank_decision(module: LightningModule) -> Callable[[bool], bool] | None:
    """The ``any_rank`` of ``NonFiniteLossGuard.should_skip`` for ``module``'s strategy: a decision
    that is true on any process is true on all (a no-op on one device); ``None`` without a Trainer.
    """
    try:
        strategy = module.trainer.strategy
    except RuntimeError:  # not attached to a Trainer
        return None
    return partial(strategy.reduce_boolean_decision, all=False)
