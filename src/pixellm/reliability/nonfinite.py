"""Training steps whose loss is NaN or infinite: skipped, counted, and fatal past a limit."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """More training losses were NaN/Inf than ``NonFiniteLossGuard.max_skipped_steps`` allows."""


class NonFiniteLossGuard:
    """Decides whether a training step is skipped because its loss is not finite.

    A skipped step makes no update (the task returns ``None`` from ``training_step``, which
    Lightning documents as "skip to the next batch"; single-device only, as Lightning says).

    Args:
        max_skipped_steps: The run stops with ``NonFiniteLossError`` at the next non-finite loss
            after this many were skipped; 0 stops at the first.
    """

    def __init__(self, max_skipped_steps: int = 10) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0

    def should_skip(self, loss: Tensor, step: int) -> bool:
        """``True`` (and counted, with a warning) when ``loss`` is NaN or infinite.

        Args:
            loss: The scalar training loss.
            step: The global step, quoted in the warning and the error.

        Raises:
            NonFiniteLossError: When this would be skipped step ``max_skipped_steps + 1``.
        """
        if bool(torch.isfinite(loss).all()):
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
