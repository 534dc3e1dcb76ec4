"""Generated codebook tokens that do not form whole, in-order groups are ignored, never misread.

``SegmentationCodebook.gather(strict=False)`` groups a sequence's codebook tokens L·N at a time by
count, filling a target's slots by position. A generation that breaks a group off
(``[SEG0] [SEG1] [SEG2] ... [SEG0] ... [SEG5]``) would then make a target from the states of the
wrong tokens: a wrong mask, silently. ``drop_malformed_groups`` keeps only the codebook tokens that
form complete groups in the codebook's order (other tokens may lie between them) and counts the
rest, which ``predict_step`` reports as ``dropped_codebook_tokens``.
"""

from __future__ import annotations

import itertools
import re

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from pixellm.data.conversation import SEG_PLACEHOLDER, fill_answer
from pixellm.data.preprocess import neutralize_tokens


def whole_groups(slots: list[int], group_size: int) -> list[list[int]]:
    """The complete in-order groups among a sequence's codebook tokens.

    A group is ``group_size`` tokens whose slots run 0, 1, ..., ``group_size - 1``; a token out of
    order ends the partial group before it (and starts a new one if its slot is 0).

    Args:
        slots: The slot (0 .. group_size - 1) of each codebook token of the sequence, in text order.
        group_size: L·N.

    Returns:
        Per complete group, the indices into ``slots`` of its tokens.
    """
    groups: list[list[int]] = []
    group: list[int] = []  # indices of the group being read
    for index, slot in enumerate(slots):
        if slot != len(group):  # out of order: the partial group is dropped
            group = []
            if slot != 0:
                continue
        group.append(index)
        if len(group) == group_size:
            groups.append(group)
            group = []
    return groups


def spelled_group(tokenizer: PreTrainedTokenizerBase, codebook_tokens: list[str]) -> list[int]:
    """The ids a target's group spans in a training answer, from its first codebook token to its last.

    Training answers write the L·N tokens space-separated (``fill_answer``) and ``TextEncoder`` tokenises
    them with ``add_special_tokens=False``; a tokenizer may put ids for the spaces between the codebook
    tokens (a SentencePiece ``▁``), which are part of the group as the model learnt it. The tokenizer
    splits the text at the added codebook tokens first, so the ids between them do not depend on the
    answer around the group.

    Raises:
        ValueError: If the codebook tokens do not come out once each, in order.
    """
    text = fill_answer(f"a {SEG_PLACEHOLDER} b", codebook_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    codes = tokenizer.convert_tokens_to_ids(codebook_tokens)
    found = [i for i in ids if i in codes]
    if found != codes:
        raise ValueError(f"{text!r} tokenises to codebook ids {found}, expected {codes} in that order")
    return ids[ids.index(codes[0]) : ids.index(codes[-1]) + 1]


def codebook_pattern(codebook_tokens: list[str]) -> re.Pattern[str]:
    """A pattern matching any of the codebook token strings (longest first)."""
    return re.compile("|".join(re.escape(t) for t in sorted(codebook_tokens, key=len, reverse=True)))


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int], codebook_ids: list[int]) -> str:
    """``tokenizer.decode(ids)``, where a codebook token string that ordinary sub-word tokens spell out
    (``[`` ``SE`` ``G`` ``0`` ``]``) is broken up (``neutralize_tokens``): every codebook string of the
    text is then a codebook id, so the groups the text shows (``group_spans``) are the masks that
    decoding the ids makes (``drop_malformed_groups``). A codebook token that the text glues to what
    precedes it (the tokens take the spaces on their left, ``load_tokenizer``) gets a space before it:
    ``"cat: [SEG0] [SEG1]"``, not ``"cat:[SEG0][SEG1]"``.
    """
    codes = set(codebook_ids)
    tokens = tokenizer.convert_ids_to_tokens(sorted(codes))
    pattern = codebook_pattern(tokens)
    text = _neutralized(tokenizer, ids, codes, tokens, pattern)
    return re.sub(rf"(?<=\S)(?={pattern.pattern})", " ", text)


def _neutralized(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], codes: set[int], tokens: list[str], pattern: re.Pattern[str]
) -> str:
    """``tokenizer.decode(ids)`` with the codebook strings that ordinary ids spell broken up (``decode_answer``)."""
    text = tokenizer.decode(ids)
    # the ids as runs: a codebook id (one string in the text) or a run of ordinary ids (those it spells)
    runs = [(key, list(run)) for key, run in itertools.groupby(ids, key=lambda i: i in codes)]
    spelled = [len(run) if code else len(pattern.findall(tokenizer.decode(run))) for code, run in runs]
    if not any(n for (code, _), n in zip(runs, spelled, strict=True) if not code):
        return text
    matches = list(pattern.finditer(text))
    if len(matches) != sum(spelled):  # the decoded runs read differently in context: decode them apart
        return "".join(tokenizer.decode(run) if code else neutralize_tokens(tokenizer.decode(run), tokens)
                       for code, run in runs)
    from_code = [code for (code, _), n in zip(runs, spelled, strict=True) for _ in range(n)]  # per match, in order
    for match, code in reversed(list(zip(matches, from_code, strict=True))):  # from the end: offsets stay valid
        if not code:
            text = text[: match.start()] + neutralize_tokens(match.group(), tokens) + text[match.end() :]
    return text


def group_spans(text: str, codebook_tokens: list[str]) -> tuple[re.Pattern[str], list[tuple[int, int]]]:
    """Where the whole in-order groups (``whole_groups``) of codebook tokens lie in decoded text.

    The k-th span is the k-th mask that decoding (``drop_malformed_groups``) makes.

    Args:
        text: decoded text holding codebook token strings.
        codebook_tokens: the L·N codebook token strings, in group order.

    Returns:
        A pattern matching any codebook token (to remove those outside the groups), and per group
        the (start, end) characters from its first token's start to its last token's end.
    """
    pattern = codebook_pattern(codebook_tokens)
    matches = list(pattern.finditer(text))
    slot = {token: k for k, token in enumerate(codebook_tokens)}
    groups = whole_groups([slot[m.group()] for m in matches], len(codebook_tokens))
    return pattern, [(matches[g[0]].start(), matches[g[-1]].end()) for g in groups]


def drop_malformed_groups(ids: Tensor, token_ids: Tensor, filler: int) -> tuple[Tensor, Tensor]:
    """Replace codebook tokens outside complete in-order groups (``whole_groups``) by ``filler``.

    Args:
        ids: (B, S) generated token ids.
        token_ids: (L·N,) the codebook's ids in group order.
        filler: A non-codebook id put in their place (e.g. the eos id).

    Returns:
        The ids with only whole groups left (B, S), and per sequence the count of codebook tokens
        replaced (B,).
    """
    order = {int(t): slot for slot, t in enumerate(token_ids.tolist())}
    is_code = torch.isin(ids, token_ids)  # (B, S)
    keep = torch.zeros_like(is_code)
    for row, columns in enumerate(is_code.nonzero().split(is_code.sum(1).tolist())):
        columns = columns[:, 1]  # (n,) the sequence's codebook positions, in order
        slots = [order[token] for token in ids[row, columns].tolist()]
        columns = columns.tolist()
        for group in whole_groups(slots, len(order)):
            keep[row, [columns[i] for i in group]] = True
    dropped = is_code & ~keep
    return ids.masked_fill(dropped, filler), dropped.sum(1)
