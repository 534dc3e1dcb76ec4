"""The loss stack (Sec. 3.2): next-token CE + per-pixel BCE + DICE + the target refinement loss.

Masks are compared at each image's original resolution, predictions paired with ground truth in
text order (no matching in training, as released). Pixels labelled ``ignore_index`` in a ground
truth (ReasonSeg's "ignore" regions) are left out of every mask term.

Defaults: the paper's objective L = L_txt + lambda_ref L_ref + lambda_dice L_dice with the released
weights (CE 1.0, mask BCE 2.0, DICE 0.5) and alpha = 2: the refinement loss *is* the alpha-weighted
BCE, so ``bce_weight`` is 0 by default and ``refinement_weight`` carries the released BCE weight.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def overlap_weights(logits: Tensor, alpha: float, owner: Tensor | None = None) -> Tensor:
    """The map A of Sec. 3.2: alpha where two or more predicted masks of a question are on (logit > 0), else 1.

    Args:
        logits: (K, H, W) mask logits.
        alpha: the weight of overlapping pixels.
        owner: (K,) long, the question of each mask, for masks of several questions at once; ``None``
            when all K masks belong to one question.

    Returns:
        Detached weights: (H, W) when ``owner`` is None, else (K, H, W), each mask with its question's map.
    """
    on = (logits.detach() > 0).to(logits.dtype)  # (K, H, W)
    if owner is None:
        return torch.where(on.sum(0) >= 2, alpha, 1.0).to(logits.dtype)  # (H, W)
    questions = int(owner.max()) + 1
    count = on.new_zeros(questions, *on.shape[1:]).index_add_(0, owner, on)  # (Q, H, W)
    return torch.where(count >= 2, alpha, 1.0).to(logits.dtype)[owner]  # (K, H, W)


def bce_per_mask(logits: Tensor, targets: Tensor, valid: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean (optionally weighted) per-pixel BCE of each mask over its valid pixels.

    Args:
        logits: (K, H, W); targets: (K, H, W) in {0, 1}; valid: (K, H, W) bool;
        weights: (H, W) or (K, H, W), or None.

    Returns:
        (K,) losses.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (K, H, W)
    if weights is not None:
        loss = loss * weights
    loss = loss * valid
    return loss.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def dice_per_mask(
    logits: Tensor, targets: Tensor, valid: Tensor, scale: float = 1000.0, eps: float = 1e-6
) -> Tensor:
    """DICE loss on sigmoid probabilities p, as released: every sum is divided by ``scale``.

    Returns:
        (K,) ``1 - (2 sum(p t) / s + eps) / (sum(p) / s + sum(t) / s + eps)`` over valid pixels.
    """
    probs = (logits.sigmoid() * valid).flatten(1)  # (K, HW)
    targets = (targets * valid).flatten(1)
    numerator = 2 * (probs * targets).sum(1) / scale
    denominator = (probs.sum(1) + targets.sum(1)) / scale
    return 1 - (numerator + eps) / (denominator + eps)


class PixelLMLoss(nn.Module):
    """Weighted sum of the loss terms; a term with weight 0 is neither computed nor logged.

    Args:
        ce_weight: next-token cross-entropy, codebook tokens included.
        bce_weight: plain per-pixel BCE, mean per mask then over masks.
        dice_weight: DICE on sigmoid probabilities.
        refinement_weight: the target refinement loss L_ref (alpha-weighted BCE, Sec. 3.2).
        alpha: weight of pixels where two or more predicted masks of a question overlap.
        dice_scale: the release's DICE scale (1000).
        dice_eps: the release's DICE epsilon (1e-6).
        ignore_index: ground-truth value excluded from the mask terms.
    """

    def __init__(
        self,
        *,
        ce_weight: float = 1.0,
        bce_weight: float = 0.0,
        dice_weight: float = 0.5,
        refinement_weight: float = 2.0,
        alpha: float = 2.0,
        dice_scale: float = 1000.0,
        dice_eps: float = 1e-6,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.weights = {"ce": ce_weight, "bce": bce_weight, "dice": dice_weight, "refinement": refinement_weight}
        self.alpha = alpha
        self.dice_scale = dice_scale
        self.dice_eps = dice_eps
        self.ignore_index = ignore_index

    @property
    def term_names(self) -> tuple[str, ...]:
        """The keys ``forward`` returns: the enabled terms, then ``"loss"``."""
        return (*(name for name in ("bce", "dice", "refinement", "ce") if self.weights[name]), "loss")

    def mask_terms(self, logits: list[Tensor], targets: list[Tensor]) -> dict[str, Tensor]:
        """Per-term mask losses averaged over all masks of the batch.

        Questions whose masks share a size (every question, on a square dataset) are computed together:
        their masks are concatenated and each term runs once per distinct size.

        Args:
            logits: per question, (K_b, H_b, W_b) predicted logits in text order.
            targets: per question, (K_b, H_b, W_b) ground truth in {0, 1, ignore_index}.
        """
        names = [name for name in ("bce", "dice", "refinement") if self.weights[name]]
        same_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for question, (pred, truth) in enumerate(zip(logits, targets, strict=True)):
            if pred.shape != truth.shape:
                raise ValueError(
                    f"question {question}: {tuple(pred.shape)} predicted masks vs "
                    f"{tuple(truth.shape)} ground-truth masks; they pair in text order"
                )
            if pred.shape[0]:
                same_size[tuple(pred.shape[1:])].append(question)
        if not same_size:  # no mask in the batch: zeros that keep the graph
            anchor = sum(pred.sum() for pred in logits) * 0.0
            return {name: anchor for name in names}
        sums = {name: [] for name in names}
        for questions in same_size.values():
            pred = torch.cat([logits[q] for q in questions])  # (M, H, W)
            truth = torch.cat([targets[q] for q in questions])
            valid = truth != self.ignore_index
            truth = truth.to(pred.dtype) * valid
            if "bce" in sums:
                sums["bce"].append(bce_per_mask(pred, truth, valid))
            if "dice" in sums:
                sums["dice"].append(dice_per_mask(pred, truth, valid, self.dice_scale, self.dice_eps))
            if "refinement" in sums:
                masks_per_question = torch.tensor([logits[q].shape[0] for q in questions], device=pred.device)
                owner = torch.repeat_interleave(masks_per_question)  # (M,) question of each mask
                weights = overlap_weights(pred, self.alpha, owner)  # (M, H, W)
                sums["refinement"].append(bce_per_mask(pred, truth, valid, weights))
        return {name: torch.cat(values).mean() for name, values in sums.items()}

    def forward(self, ce: Tensor, logits: list[Tensor], targets: list[Tensor]) -> dict[str, Tensor]:
        """All enabled terms and their weighted sum under ``"loss"``."""
        terms = self.mask_terms(logits, targets)
        if self.weights["ce"]:
            terms["ce"] = ce
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms
