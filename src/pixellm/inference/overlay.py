"""Overlay picture: masks in distinct colours on the image, numbered, with a legend underneath."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.5  # opacity of a mask's colour
BASE_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128),
)  # well separated colours (Sasha Trubetskoy's list) for the first ten targets
LEGEND_ROW = 14  # pixels per legend line
SWATCH = 10  # side of a legend colour square


def target_colour(index: int) -> tuple[int, int, int]:
    """Colour of target ``index`` (from 0): the fixed list, then golden-ratio hues."""
    if index < len(BASE_COLOURS):
        return BASE_COLOURS[index]
    hue = (index * 0.618033988749895) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def draw_overlay(image: Image.Image, masks: torch.Tensor, labels: list[str]) -> Image.Image:
    """The image with mask k tinted in ``target_colour(k - 1)``, its number at its centre, a legend.

    Args:
        image: RGB image (W, H).
        masks: (K, H, W) bool masks in answer order (mask k is ``[k]``).
        labels: K legend texts.

    Returns:
        An RGB image as wide as the image or the legend, with one legend row per target below.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    for k, mask in enumerate(masks.cpu().numpy()):
        colour = np.array(target_colour(k), dtype=np.float32)
        pixels[mask] = (1 - ALPHA) * pixels[mask] + ALPHA * colour
    tinted = Image.fromarray(pixels.round().astype(np.uint8))
    font = ImageFont.load_default()
    entries = [f"[{k + 1}] {label}".rstrip() for k, label in enumerate(labels)]
    width = max([tinted.width, *(SWATCH + 8 + int(font.getlength(e)) for e in entries)])
    canvas = Image.new("RGB", (width, tinted.height + LEGEND_ROW * len(entries)), (255, 255, 255))
    canvas.paste(tinted, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, mask in enumerate(masks.cpu()):
        if mask.any():
            ys, xs = torch.nonzero(mask, as_tuple=True)
            centre = (float(xs.float().mean()), float(ys.float().mean()))
            draw.text(centre, str(k + 1), fill=(255, 255, 255), font=font, anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    for k, entry in enumerate(entries):
        top = tinted.height + k * LEGEND_ROW + 2
        draw.rectangle((2, top, 2 + SWATCH, top + SWATCH), fill=target_colour(k))
        draw.text((SWATCH + 6, top - 1), entry, fill=(0, 0, 0), font=font)
    return canvas
