"""Answer text for people: each target's codebook tokens replaced by its number, ``[1]``, ``[2]``...

Targets are numbered as decoding makes their masks: the k-th complete in-order group of codebook
tokens (``pixellm.reliability.codebook_groups.group_spans``) is mask k, so ``[k]`` names mask k.
Codebook tokens outside complete groups (broken off, out of order, an incomplete tail) make no
mask and are removed from the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pixellm.reliability.codebook_groups import group_spans

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
    pattern, spans = group_spans(answer, codebook_tokens)
    pieces, labels, start = [], [], 0
    for begin, end in spans:
        phrase = _clean(pattern.sub("", answer[start:begin]))
        labels.append(" ".join(_LEADING_JOINERS.sub("", phrase).split()[-LABEL_WORDS:]))
        pieces += [phrase, f"[{len(labels)}]"]
        start = end
    pieces.append(pattern.sub("", answer[start:]))
    return NumberedAnswer(text=_clean(" ".join(pieces)), labels=labels)


def _clean(text: str) -> str:
    """Collapse white space and drop spaces before punctuation."""
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
