"""Generated codebook tokens that do not form whole, in-order groups are ignored, never misread.

``SegmentationCodebook.gather(strict=False)`` groups a sequence's codebook tokens L·N at a time by
count, filling a target's slots by position. A generation that breaks a group off
(``[SEG0] [SEG1] [SEG2] ... [SEG0] ... [SEG5]``) would then make a target from the states of the
wrong tokens: a wrong mask, silently. ``drop_malformed_groups`` keeps only the codebook tokens that
form complete groups in the codebook's order (other tokens may lie between them) and counts the
rest, which ``predict_step`` reports as ``dropped_codebook_tokens``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def drop_malformed_groups(ids: Tensor, token_ids: Tensor, filler: int) -> tuple[Tensor, Tensor]:
    """Replace codebook tokens outside complete in-order groups by ``filler``.

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
    for row, col_list in enumerate(is_code.tolist()):
        group: list[int] = []  # columns of the group being read
        for col, coded in enumerate(col_list):
            if not coded:
                continue
            slot = order[int(ids[row, col])]
            if slot != len(group):  # out of order: the partial group is dropped
                group = []
                if slot != 0:
                    continue
            group.append(col)
            if len(group) == len(order):
                keep[row, group] = True
                group = []
    dropped = is_code & ~keep
    return ids.masked_fill(dropped, filler), dropped.sum(1)
