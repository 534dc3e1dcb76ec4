"""Batch collation: samples -> the dict of tensors the model consumes.

Batch keys (B samples, T tokens, S image side):

- ``pixel_values`` float32 (B, 3, S, S): resized, normalised, zero-padded images.
- ``input_ids`` long (B, T) and ``attention_mask`` long (B, T). In "train" mode the whole
  conversation, RIGHT-padded (pad id / 0); in "generate" mode the prompt only (``[bos] + prompt``,
  ending after "ASSISTANT:"), LEFT-padded.
- ``labels`` long (B, T), "train" mode only: -100 on bos, prompt and padding.
- ``masks``: list of B float32 tensors (K_b, H_b, W_b) in {0, 1} (255: ignored pixel), original
  size, text order; K_b = 0 for a question without targets (VQA). A target whose codebook tokens
  were cut by ``max_length`` truncation loses its mask too (counted, see ``TruncationReport``).
- ``resized_sizes`` long (B, 2) (h, w) before padding; ``original_sizes`` long (B, 2) (H, W);
  ``padded`` bool: whether any image has padding (a host-side flag: the model learns it without
  reading ``resized_sizes`` back from the GPU).
- ``questions``, ``answers`` (answers with codebook tokens) list[str]; ``meta`` list[dict].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import transformers

from pixellm.data.preprocess import (
    DEFAULT_PIXEL_MEAN,
    DEFAULT_PIXEL_STD,
    IGNORE_INDEX,
    EncodedText,
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


@dataclass
class TruncationReport:
    """Running count of what ``max_length`` truncation removed in one process.

    A warning is emitted at the first dropped target and whenever the count of dropped targets
    reaches a power of two, so a long run gets a handful of summaries, not one line per sample.
    """

    samples: int = 0
    truncated_samples: int = 0
    dropped_targets: int = 0

    warned_at: int = 0

    def add(self, encoded: EncodedText) -> None:
        """Count one encoded sample."""
        self.samples += 1
        self.truncated_samples += encoded.cut_tokens > 0
        self.dropped_targets += encoded.dropped_targets

    def warn(self, max_length: int | None) -> None:
        """Warn if the dropped targets reached their first or a new power-of-two count."""
        if self.dropped_targets and self.dropped_targets.bit_length() > self.warned_at.bit_length():
            self.warned_at = self.dropped_targets
            warnings.warn(
                f"max_length={max_length} truncation so far: {self.truncated_samples} of "
                f"{self.samples} samples cut, {self.dropped_targets} targets dropped with their "
                "masks (codebook tokens cut away); raise max_length to keep them",
                stacklevel=3,
            )


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
        max_length: Longest sequence in LLM positions, or None (see ``TextEncoder``).
        image_length: LLM positions of the image (see ``TextEncoder``).
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
        max_length: int | None = None,
        image_length: int = 1,
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"collate mode must be 'train' or 'generate', got {mode!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; build it with pixellm.tokenizer.load_tokenizer"
            )
        self.encoder = TextEncoder(tokenizer, codebook_tokens, template, max_length, image_length)
        self.transform = ImageTransform(image_size, pixel_mean, pixel_std)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mode = mode
        self.truncation = TruncationReport()

    def _encode(self, sample: Sample) -> EncodedText:
        meta = sample.meta
        parts = [str(meta[key]) for key in ("dataset", "json") if meta.get(key)]
        parts += [f"{name} {meta[key]}" for key, name in (("record_index", "record"), ("question_index", "question"))
                  if meta.get(key) is not None]
        where = " ".join(parts) or str(meta.get("file_name", "sample"))  # a request at inference: its image
        return self.encoder.encode(
            sample.question, sample.answer, sample.masks.shape[0], where, sample.history
        )

    def check(self, sample: Sample) -> None:
        """Raise the ``DataError`` that collating ``sample`` would raise; count nothing."""
        self._encode(sample)

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        pixels, resized, original, encoded = [], [], [], []
        for sample in samples:
            image, hw = self.transform(sample.image)
            pixels.append(image)  # (3, S, S)
            resized.append(hw)
            original.append((sample.image.height, sample.image.width))
            encoded.append(self._encode(sample))
        if self.mode == "train":  # counted once the whole batch encodes, so a refused batch counts nothing
            for e in encoded:
                self.truncation.add(e)
        self.truncation.warn(self.encoder.max_length)
        kept = [e.num_targets if self.mode == "train" else s.masks.shape[0] for s, e in zip(samples, encoded, strict=True)]
        batch: dict[str, Any] = {
            "pixel_values": torch.stack(pixels),  # (B, 3, S, S)
            "masks": [s.masks[:k].float() for s, k in zip(samples, kept, strict=True)],  # B x (K_b, H_b, W_b)
            "resized_sizes": torch.tensor(resized, dtype=torch.long),  # (B, 2)
            "original_sizes": torch.tensor(original, dtype=torch.long),  # (B, 2)
            "padded": any(min(hw) < self.transform.image_size for hw in resized),
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
            ids = [e.prompt_ids for e in encoded]
            batch["input_ids"] = pad_sequences(ids, self.pad_id, "left")  # (B, T)
            batch["attention_mask"] = pad_sequences([[1] * len(i) for i in ids], 0, "left")
        return batch
