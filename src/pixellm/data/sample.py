"""The item every dataset of pixellm returns, before tokenisation and image preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class Sample:
    """One question about one image, with the target masks in the answer's text order.

    Attributes:
        image: The image as a PIL RGB image at its original size (W, H).
        question: The user's question, without an image token.
        answer: The answer text with one ``{seg}`` placeholder per target, in mask order.
        masks: Target masks (K, H, W) uint8 in {0, 1}, 255 where a pixel is ignored by the loss
            and the metrics; K == 0 for a question without targets (VQA, "there is no ...").
        meta: Where the sample comes from: ``dataset`` (its name), ``json`` (file),
            ``record_index``, ``question_index``, ``file_name`` (relative image path); and
            ``targets``, one dict per mask in text order with ``description`` (str) and ``bbox``
            ([x0, y0, x1, y1] in original pixels), used by the MUSE evaluation protocol.
        history: Earlier (question, answer) turns of the same conversation, text only (no
            ``{seg}``), placed before ``question`` by the conversation template (multi-turn VQA).
    """

    image: Image.Image
    question: str
    answer: str
    masks: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
