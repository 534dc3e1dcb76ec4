"""Per-sample preprocessing: the image transform and the tokenisation of one conversation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from PIL import Image

from pixellm.data.conversation import fill_answer, get_template, turn_prompts
from pixellm.data.errors import DataError
from pixellm.tokenizer import IMAGE_TOKEN

IGNORE_INDEX = -100
DEFAULT_PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet/SAM mean, 0-255 units (the release's)
DEFAULT_PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``image_size`` (rounded as SAM does; at least 1
    pixel, so a very long, thin image keeps a side of 1 where SAM's rounding would give 0)."""
    scale = image_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


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


def _single_token(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> bool:
    """Whether the tokenizer holds ``text`` as one known token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one conversation: ``[bos] + turn prompts and answers, each answer + [eos]``.

    Attributes:
        input_ids: The whole sequence, truncated to the encoder's ``max_length``.
        labels: The ids on every answer and its eos (the history's included), ``IGNORE_INDEX``
            elsewhere (bos, prompts).
        prompt_ids: ``input_ids`` up to the final answer, never truncated: the generation prompt.
        answer: The final answer text with codebook tokens in place of ``{seg}``.
        num_targets: Targets whose codebook tokens are all in ``input_ids``: the first
            ``num_targets`` masks of the sample belong to this sequence.
        dropped_targets: Targets cut away by truncation (their masks must be dropped too).
        cut_tokens: Ids removed by truncation.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answer: str
    num_targets: int
    dropped_targets: int = 0
    cut_tokens: int = 0


class TextEncoder:
    """Tokenise conversations with a template; labels on the answers only.

    Prompts and answers are tokenised separately without special tokens, so the generation prompt
    is exactly the training prefix; codebook tokens are part of the labels. Sequences longer than
    ``max_length`` are cut at the end (as the release does), but never inside a target's group of
    codebook tokens: the cut moves back to the start of that group, and the group's target is
    reported as dropped so its mask is dropped with it.

    Args:
        tokenizer: A tokenizer from ``load_tokenizer`` (image and codebook tokens added).
        codebook_tokens: The L·N codebook token strings, written once per target.
        template: Conversation template name (see ``pixellm.data.conversation.TEMPLATES``).
        max_length: Longest sequence in LLM positions (release ``model_max_length``: 512), or None
            for no limit.
        image_length: LLM positions the one image token expands to (release: 256, so 512 - 255
            text tokens fit); 1 counts the image as one token.
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        codebook_tokens: list[str],
        template: str,
        max_length: int | None = None,
        image_length: int = 1,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos token; set eos_token in its tokenizer_config.json"
            )
        if image_length < 1 or (max_length is not None and max_length < image_length + 1):
            raise ValueError(
                f"need image_length >= 1 and max_length > image_length, got {image_length} and {max_length}"
            )
        self.template = get_template(template)  # fails early on an unknown template name
        lacking = [t for t in self.template.special_tokens if not _single_token(tokenizer, t)]
        if lacking:
            raise ValueError(f"the template {template!r} needs the tokens {lacking}, which the tokenizer does not hold")
        self.template_name = template
        self.tokenizer = tokenizer
        self.codebook_tokens = list(codebook_tokens)
        self.codebook_ids = set(tokenizer.convert_tokens_to_ids(self.codebook_tokens))
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length, self.image_length = max_length, image_length
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(
        self,
        question: str,
        answer: str,
        num_targets: int,
        where: str = "",
        history: Sequence[tuple[str, str]] = (),
    ) -> EncodedText:
        """Tokenise one sample.

        Args:
            question: The final question.
            answer: The final answer with one ``{seg}`` per target.
            num_targets: K, the number of target masks.
            where: Text naming the sample in error messages (file, record, question).
            history: Earlier (question, answer) turns, text only, oldest first.

        Codebook token strings typed in the questions are neutralised (see ``neutralize_tokens``).

        Raises:
            DataError: If the question is empty, a text is not valid Unicode, the answer's
                codebook tokens are not K·L·N, the history's answers hold codebook tokens, or the
                image token is not there exactly once.
        """
        if not question.strip():
            raise DataError(f"{where}: the question is empty")
        texts = [question, answer, *(t for turn in history for t in turn)]
        try:
            for text in texts:
                text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"{where}: text holds an invalid character ({err.reason})") from err
        questions = [neutralize_tokens(q, self.codebook_tokens) for q, _ in history]
        questions.append(neutralize_tokens(question, self.codebook_tokens))
        try:
            prompts = turn_prompts(self.template_name, questions)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from err
        filled = fill_answer(answer, self.codebook_tokens)
        answers = [a for _, a in history] + [filled]
        ids: list[int] = []
        labels: list[int] = []
        for turn, (prompt, text) in enumerate(zip(prompts, answers, strict=True)):
            opening = self.bos if turn == 0 or self.template.bos_each_turn else []
            prompt_ids = opening + self._ids(prompt)
            answer_ids = self._ids(text) + [self.tokenizer.eos_token_id]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        prompt_length = len(ids) - len(answer_ids)
        codebook_positions = [p for p, i in enumerate(ids) if i in self.codebook_ids]
        expected = num_targets * len(self.codebook_tokens)
        if len(codebook_positions) != expected or (expected and codebook_positions[0] < prompt_length):
            raise DataError(
                f"{where}: answer {answer!r} has {len(codebook_positions)} codebook tokens in the "
                f"conversation, expected {num_targets} targets x {len(self.codebook_tokens)} in the answer"
            )
        if ids.count(self.image_id) != 1:
            raise DataError(f"{where}: the sequence must hold exactly one {IMAGE_TOKEN!r}")
        cut, kept = self._cut(ids, codebook_positions)
        return EncodedText(
            input_ids=ids[:cut],
            labels=labels[:cut],
            prompt_ids=ids[:prompt_length],
            answer=filled,
            num_targets=kept,
            dropped_targets=num_targets - kept,
            cut_tokens=len(ids) - cut,
        )

    def _cut(self, ids: list[int], codebook_positions: list[int]) -> tuple[int, int]:
        """Where to cut ``ids`` and how many whole codebook groups stay before the cut."""
        group = len(self.codebook_tokens)
        num_groups = len(codebook_positions) // group
        if self.max_length is None or len(ids) + self.image_length - 1 <= self.max_length:
            return len(ids), num_groups
        cut = max(self.max_length - self.image_length + 1, ids.index(self.image_id) + 1)
        kept = sum(codebook_positions[(g + 1) * group - 1] < cut for g in range(num_groups))
        if kept < num_groups:
            cut = min(cut, codebook_positions[kept * group])
        return cut, kept
