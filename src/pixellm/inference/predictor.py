"""Batched inference with an exported folder: images + questions -> answers, masks and scores.

Requests go through the same collator as evaluation (``MuseCollator`` in "generate" mode) and the
task's own ``predict_step``, so a folder predicts exactly what ``pixellm predict --config`` does.
Batches are left-padded; answers and masks do not depend on the batch size (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pixellm.data.collate import MuseCollator
from pixellm.data.sample import Sample
from pixellm.export import PretrainedModel, load_pretrained
from pixellm.inference.answer import number_targets
from pixellm.inference.quantize import quantize_llm

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Request:
    """One question about one image.

    Attributes:
        image: the image, RGB at its stored size.
        question: the question, without an image token.
        source: where the image comes from (a path; names the output files).
        history: earlier (question, answer) turns about the same image, text only.
    """

    image: Image.Image
    question: str
    source: str = "image"
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Prediction:
    """The model's reply to one request.

    Attributes:
        request: what was asked.
        answer: the raw answer, codebook tokens included.
        text: the answer with ``[k]`` in place of target k's codebook tokens.
        labels: per target, the words before its marker (legend text).
        masks: (K, H, W) bool masks at the image's size, mask k-1 is ``[k]``.
        scores: (K,) mask scores in [0, 1]: the mean probability inside each mask (as the release).
        dropped_codebook_tokens: codebook tokens of an incomplete group, which make no mask.
    """

    request: Request
    answer: str
    text: str
    labels: list[str]
    masks: torch.Tensor
    scores: torch.Tensor
    dropped_codebook_tokens: int


def mask_scores(logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) logits -> (K,) mean sigmoid over the pixels with logit > 0 (0 for an empty mask).

    The released code's ``mask_scores`` (model/PixelLM.py), with its 1e-6 in the denominator.
    """
    logits = logits.float()
    inside = (logits > 0).flatten(1).float()  # (K, H*W)
    return (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; other values as ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU.

    Raises:
        ValueError: an unknown precision, or half precision asked for on CPU.
    """
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        raise ValueError(f"precision {precision} needs a GPU; on CPU use fp32")
    return PRECISIONS[precision]


class Predictor:
    """Answers requests with a loaded folder, ``batch_size`` requests at a time.

    Args:
        model: a loaded folder (:func:`pixellm.export.load_pretrained`).
        device: where the model runs.
        dtype: weights and activations dtype (fp32 on CPU; bf16/fp16 on GPU).
        batch_size: requests per forward pass.
        max_new_tokens: answer length limit (default: the folder's).
        quantize: ``"8bit"`` or ``"4bit"`` LLM weights (needs bitsandbytes), or None.
    """

    def __init__(
        self,
        model: PretrainedModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
        max_new_tokens: int | None = None,
        quantize: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = model.task.to(device=device, dtype=dtype).eval()
        if quantize is not None:
            quantize_llm(self.task, quantize, dtype, torch.device(device))
        if max_new_tokens is not None:
            self.task.max_new_tokens = max_new_tokens
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        pre = model.preprocess
        self.collator = MuseCollator(
            self.task.tokenizer, self.task.codebook.tokens, pre.template, pre.image_size,
            pre.pixel_mean, pre.pixel_std, mode="generate",
        )

    @classmethod
    def from_folder(
        cls,
        directory: str | Path,
        base_model: str | None = None,
        vision_model: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        **kwargs,
    ) -> Predictor:
        """Load a folder and place it on ``device`` in ``precision`` (see :func:`resolve_dtype`)."""
        where = resolve_device(device)
        dtype = resolve_dtype(precision, where)
        model = load_pretrained(directory, base_model=base_model, vision_model=vision_model)
        return cls(model, where, dtype, **kwargs)

    def _batch(self, requests: list[Request]) -> dict:
        samples = [
            Sample(
                image=r.image,
                question=r.question,
                answer="",
                masks=torch.zeros(0, r.image.height, r.image.width, dtype=torch.uint8),
                meta={"file_name": r.source},
                history=list(r.history),
            )
            for r in requests
        ]
        batch = self.collator(samples)
        for key in ("pixel_values", "input_ids", "attention_mask"):
            batch[key] = batch[key].to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    @torch.no_grad()
    def predict(self, requests: list[Request]) -> list[Prediction]:
        """Answer ``requests`` in one forward pass."""
        outputs = self.task.predict_step(self._batch(requests), 0)
        predictions = []
        for request, out in zip(requests, outputs, strict=True):
            numbered = number_targets(out["answer"], self.task.codebook.tokens)
            predictions.append(
                Prediction(
                    request=request,
                    answer=out["answer"],
                    text=numbered.text,
                    labels=numbered.labels,
                    masks=out["masks"].cpu(),
                    scores=mask_scores(out["mask_logits"]).cpu(),
                    dropped_codebook_tokens=out["dropped_codebook_tokens"],
                )
            )
        return predictions

    def predict_all(self, requests: Iterable[Request]) -> Iterator[Prediction]:
        """Answer ``requests`` ``batch_size`` at a time, in order."""
        pending: list[Request] = []
        for request in requests:
            pending.append(request)
            if len(pending) == self.batch_size:
                yield from self.predict(pending)
                pending = []
        if pending:
            yield from self.predict(pending)
