"""Batch collation: samples -> the dict of tensors the model consumes.

Batch keys (B samples, T tokens, S image side):

- ``pixel_values`` float32 (B, 3, S, S): resized, normalised, zero-padded images.
- ``input_ids`` long (B, T) and ``attention_mask`` long (B, T). In "train" mode the whole
  conversation, RIGHT-padded (pad id / 0); in "generate" mode the prompt only (``[bos] + prompt``,
  ending after "ASSISTANT:"), LEFT-padded.
- ``labels`` long (B, T), "train" mode only: -100 on bos, prompt and padding.
- ``masks``: list of B float32 tensors (K_b, H_b, W_b) in {0, 1}, original size, text order.
- ``resized_sizes`` long (B, 2) (h, w) before padding; ``original_sizes`` long (B, 2) (H, W).
- ``questions``, ``answers`` (answers with codebook tokens) list[str]; ``meta`` list[dict].
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import transformers

from pixellm.data.preprocess import (
    DEFAULT_PIXEL_MEAN,
    DEFAULT_PIXEL_STD,
    IGNORE_INDEX,
    ImageTransform,
    TextEncoder,
)
from pixellm.data.sample import Sample

CollateMode = Literal["train", "generate"]


def pad_sequences(sequences: list[list[int]], value: int, side: str) -> torch.Tensor:
    """Pad lists of ids to one length on the ``"right"`` or ``"left"``: (B, T) long."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        values = torch.tensor(seq, dtype=torch.long)
        if side == "left":
            out[row, length - len(seq) :] = values
        else:
            out[row, : len(seq)] = values
    return out


class MuseCollator:
    """Picklable collate function (works in DataLoader worker processes).

    Args:
        tokenizer: A tokenizer from ``load_tokenizer``.
        codebook_tokens: The L·N codebook token strings.
        template: Conversation template name.
        image_size: Side S of the model's square input.
        pixel_mean: RGB mean in 0-255 units.
        pixel_std: RGB standard deviation in 0-255 units.
        mode: "train" (teacher forcing, with labels) or "generate" (prompt only, no labels).
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        codebook_tokens: list[str],
        template: str,
        image_size: int,
        pixel_mean: tuple[float, float, float] = DEFAULT_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = DEFAULT_PIXEL_STD,
        mode: CollateMode = "train",
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"collate mode must be 'train' or 'generate', got {mode!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; build it with pixellm.tokenizer.load_tokenizer"
            )
        self.encoder = TextEncoder(tokenizer, codebook_tokens, template)
        self.transform = ImageTransform(image_size, pixel_mean, pixel_std)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mode = mode

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        pixels, resized, original, encoded = [], [], [], []
        for sample in samples:
            image, hw = self.transform(sample.image)
            pixels.append(image)  # (3, S, S)
            resized.append(hw)
            original.append((sample.image.height, sample.image.width))
            meta = sample.meta
            where = (
                f"{meta.get('json')} record {meta.get('record_index')} "
                f"question {meta.get('question_index')}"
            )
            encoded.append(
                self.encoder.encode(sample.question, sample.answer, sample.masks.shape[0], where)
            )
        batch: dict[str, Any] = {
            "pixel_values": torch.stack(pixels),  # (B, 3, S, S)
            "masks": [s.masks.float() for s in samples],  # B x (K_b, H_b, W_b)
            "resized_sizes": torch.tensor(resized, dtype=torch.long),  # (B, 2)
            "original_sizes": torch.tensor(original, dtype=torch.long),  # (B, 2)
            "questions": [s.question for s in samples],
            "answers": [e.answer for e in encoded],
            "meta": [s.meta for s in samples],
        }
        if self.mode == "train":
            ids = [e.input_ids for e in encoded]
            batch["input_ids"] = pad_sequences(ids, self.pad_id, "right")  # (B, T)
            batch["attention_mask"] = pad_sequences([[1] * len(i) for i in ids], 0, "right")
            batch["labels"] = pad_sequences([e.labels for e in encoded], IGNORE_INDEX, "right")
        else:
            ids = [e.input_ids[: e.prompt_length] for e in encoded]
            batch["input_ids"] = pad_sequences(ids, self.pad_id, "left")  # (B, T)
            batch["attention_mask"] = pad_sequences([[1] * len(i) for i in ids], 0, "left")
        return batch
