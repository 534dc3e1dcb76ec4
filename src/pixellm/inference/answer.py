"""Answer text for people: each target's codebook tokens replaced by its number, ``[1]``, ``[2]``...

Targets are numbered as the model groups them (``SegmentationCodebook.gather``): every L*N-th
codebook token in the answer closes one target, in text order, so ``[k]`` names mask k. Codebook
tokens of an incomplete trailing group make no mask and are removed from the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABEL_WORDS = 5  # words of the phrase before a marker kept as its legend label
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")
_LEADING_JOINERS = re.compile(r"^(?:and|or|,|;|:)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class NumberedAnswer:
    """The answer with ``[k]`` markers and, per target k (from 1), a short label for legends."""

    text: str
    labels: list[str]


def number_targets(answer: str, codebook_tokens: list[str]) -> NumberedAnswer:
    """Replace each complete group of codebook tokens in ``answer`` by ``[k]``.

    Args:
        answer: decoded answer holding the codebook token strings.
        codebook_tokens: the L*N codebook token strings.

    Returns:
        For ``"the cat [SEG0] ... [SEG5] and the dog [SEG0] ... [SEG5]."`` (L*N = 6):
        ``"the cat [1] and the dog [2]."`` with labels ``["the cat", "the dog"]``.
    """
    pattern = re.compile("|".join(re.escape(t) for t in sorted(codebook_tokens, key=len, reverse=True)))
    group = len(codebook_tokens)
    found = list(pattern.finditer(answer))
    complete = len(found) // group * group
    pieces, labels, start, phrase_start = [], [], 0, 0
    for index, match in enumerate(found):
        pieces.append(answer[start : match.start()])
        start = match.end()
        if index < complete and (index + 1) % group == 0:
            phrase = _clean("".join(pieces)[phrase_start:])
            labels.append(" ".join(_LEADING_JOINERS.sub("", phrase).split()[-LABEL_WORDS:]))
            pieces.append(f" [{len(labels)}]")
            phrase_start = len("".join(pieces))
    pieces.append(answer[start:])
    return NumberedAnswer(text=_clean("".join(pieces)), labels=labels)


def _clean(text: str) -> str:
    """Collapse white space and drop spaces before punctuation."""
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
