"""Mask overlays a person can look at: the input image with predicted and ground-truth masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTION_RGB = (1.0, 0.15, 0.15)  # red
GROUND_TRUTH_RGB = (0.15, 0.9, 0.15)  # green; where both overlap the blend reads yellow
OPACITY = 0.5


def unnormalise(
    pixels: Tensor, resized: tuple[int, int], original: tuple[int, int],
    mean: tuple[float, float, float] | None, std: tuple[float, float, float] | None,
) -> Tensor:
    """The model input back to an RGB image in [0, 1] at the original size.

    Args:
        pixels: (3, S, S) normalised, zero-padded model input.
        resized: (h, w) of the image inside the padding.
        original: (H, W) original size.
        mean: RGB mean in 0-255 units used to normalise; ``None``: rescale min-max instead.
        std: RGB standard deviation in 0-255 units.
    """
    image = pixels[:, : resized[0], : resized[1]].float()  # (3, h, w)
    if mean is not None and std is not None:
        image = image * image.new_tensor(std)[:, None, None] + image.new_tensor(mean)[:, None, None]
        image = image / 255
    else:
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-6)
    image = F.interpolate(image[None], size=tuple(original), mode="bilinear", align_corners=False)[0]
    return image.clamp(0, 1)  # (3, H, W)


def mask_overlay(image: Tensor, predicted: Tensor, truth: Tensor) -> Tensor:
    """(3, H, W) image in [0, 1] tinted red by the union of the predicted masks and green by the
    union of the ground-truth masks (pixels equal to 1).

    Args:
        image: (3, H, W) in [0, 1].
        predicted: (P, H, W) bool.
        truth: (G, H, W) in {0, 1, 255}.
    """
    out = image.clone()
    for masks, colour in ((predicted.bool(), PREDICTION_RGB), ((truth == 1), GROUND_TRUTH_RGB)):
        if masks.shape[0] == 0:
            continue
        where = masks.any(0)  # (H, W)
        tint = out.new_tensor(colour)[:, None, None].expand_as(out)
        out = torch.where(where, (1 - OPACITY) * out + OPACITY * tint, out)
    return out
