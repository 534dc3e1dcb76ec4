"""Per-sample preprocessing: the image transform and the tokenisation of one conversation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.data import Subset

from pixellm.data.conversation import build_prompt, fill_answer
from pixellm.data.errors import DataError
from pixellm.data.muse import MuseDataset
from pixellm.tokenizer import IMAGE_TOKEN

IGNORE_INDEX = -100
DEFAULT_PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet/SAM mean, 0-255 units (the release's)
DEFAULT_PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``image_size`` (rounded as SAM does)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ImageTransform:
    """Resize the longest side to ``image_size`` (bilinear), normalise, pad bottom/right with 0.

    The padding is added after normalisation, as in the release, so padded pixels are exactly 0.

    Args:
        image_size: Side S of the square output.
        pixel_mean: Per-channel RGB mean in 0-255 units.
        pixel_std: Per-channel RGB standard deviation in 0-255 units.
    """

    def __init__(
        self,
        image_size: int,
        pixel_mean: tuple[float, float, float] = DEFAULT_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = DEFAULT_PIXEL_STD,
    ) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Return pixel values (3, S, S) float32 and the resized (h, w) before padding."""
        h, w = resized_shape(image.height, image.width, self.image_size)
        resized = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR))  # (h, w, 3)
        pixels = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() - self.mean) / self.std
        out = torch.zeros(3, self.image_size, self.image_size)
        out[:, :h, :w] = pixels  # (3, S, S)
        return out, (h, w)


def neutralize_tokens(text: str, tokens: list[str]) -> str:
    """``text`` with each literal ``tokens`` string broken by a space after its first character.

    A user who types ``[SEG0]`` in a question gets ordinary text, never a codebook token (which
    would add a target and pair the masks with the wrong states).
    """
    while any(t in text for t in tokens):
        for token in tokens:
            text = text.replace(token, token[0] + " " + token[1:])
    return text


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one conversation: ``[bos] + prompt + answer + [eos]``.

    Attributes:
        input_ids: The whole sequence.
        labels: ``IGNORE_INDEX`` on bos and prompt, the ids on answer and eos.
        prompt_length: Length of ``[bos] + prompt``; the generation prompt is
            ``input_ids[:prompt_length]``.
        answer: The answer text with codebook tokens in place of ``{seg}``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    answer: str


class TextEncoder:
    """Tokenise (question, answer) pairs with a conversation template.

    Prompt and answer are tokenised separately without special tokens, so the generation prompt
    is exactly the training prefix; codebook tokens are part of the labels.

    Args:
        tokenizer: A tokenizer from ``load_tokenizer`` (image and codebook tokens added).
        codebook_tokens: The L·N codebook token strings, written once per target.
        template: Conversation template name ("llava_v1" or "plain").
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        codebook_tokens: list[str],
        template: str,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos token; set eos_token in its tokenizer_config.json"
            )
        build_prompt(template, "")  # fail early on an unknown template name
        self.tokenizer = tokenizer
        self.codebook_tokens = list(codebook_tokens)
        self.codebook_ids = set(tokenizer.convert_tokens_to_ids(self.codebook_tokens))
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.template = template
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, question: str, answer: str, num_targets: int, where: str = "") -> EncodedText:
        """Tokenise one sample.

        Args:
            question: The question text.
            answer: The answer with one ``{seg}`` per target.
            num_targets: K, the number of target masks.
            where: Text naming the sample in error messages (file, record, question).

        Codebook token strings typed in the question are neutralised (see ``neutralize_tokens``).

        Raises:
            DataError: If the question is empty or not valid Unicode, the answer's codebook tokens
                are not K·L·N or the image token is not there exactly once.
        """
        if not question.strip():
            raise DataError(f"{where}: the question is empty")
        try:
            question.encode("utf-8"), answer.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"{where}: text holds an invalid character ({err.reason})") from err
        question = neutralize_tokens(question, self.codebook_tokens)
        try:
            prompt_ids = self.bos + self._ids(build_prompt(self.template, question))
        except ValueError as err:
            raise DataError(f"{where}: {err}") from err
        filled = fill_answer(answer, self.codebook_tokens)
        answer_ids = self._ids(filled) + [self.tokenizer.eos_token_id]
        found = sum(i in self.codebook_ids for i in answer_ids)
        if found != num_targets * len(self.codebook_tokens):
            raise DataError(
                f"{where}: answer {answer!r} has {found} codebook tokens, expected "
                f"{num_targets} targets x {len(self.codebook_tokens)}"
            )
        if prompt_ids.count(self.image_id) != 1 or self.image_id in answer_ids:
            raise DataError(f"{where}: the sequence must hold exactly one {IMAGE_TOKEN!r}")
        return EncodedText(
            input_ids=prompt_ids + answer_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            prompt_length=len(prompt_ids),
            answer=filled,
        )


def drop_long_samples(dataset: MuseDataset, encoder: TextEncoder, max_length: int) -> Subset:
    """Keep the samples whose whole sequence fits ``max_length`` tokens (the image counts as one).

    Long samples are skipped, never truncated (that could cut codebook tokens away), and so are
    samples whose text ``encoder`` refuses (``DataError``: empty question, codebook count unlike
    the targets, ...); one summary warning counts each kind and quotes the first refusal.
    """
    keep, refused = [], []
    for i in range(len(dataset)):
        question, answer, k = dataset.text(i)
        record, q = dataset.items[i]
        where = f"{dataset.json_path}: record {record} question {q}"
        try:
            length = len(encoder.encode(question, answer, k, where=where).input_ids)
        except DataError as err:
            refused.append(str(err))
            continue
        if length <= max_length:
            keep.append(i)
    if len(keep) + len(refused) < len(dataset):
        warnings.warn(
            f"{dataset.json_path}: skipped {len(dataset) - len(keep) - len(refused)} of "
            f"{len(dataset)} samples longer than max_length={max_length} tokens",
            stacklevel=2,
        )
    if refused:
        warnings.warn(
            f"{dataset.json_path}: skipped {len(refused)} of {len(dataset)} samples whose text "
            f"cannot be encoded; first: {refused[0]}",
            stacklevel=2,
        )
    return Subset(dataset, keep)
