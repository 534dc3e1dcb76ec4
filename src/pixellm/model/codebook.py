"""Segmentation codebook C_seg: L scale groups x N tokens, gathering and token fusion (Sec. 3.1).

One target is written in the answer as its L*N codebook tokens, scale-major (for L=2, N=3:
``[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]``, the first three feeding scale 0). The hidden state taken
for a codebook token is the last-layer state at the position *before* it, i.e. the state that emits
the token, as the released code does: a prototype measured here showed the token's own state
stays at the "segment everything" level on the embedded dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pixellm.tokenizer import codebook_token_strings


@dataclass
class GatheredTargets:
    """Codebook states of every complete target in a batch, in text order."""

    states: Tensor  # (T, L, N, H)
    batch_index: Tensor  # (T,) the sequence each target belongs to
    dropped_tokens: Tensor  # (B,) codebook tokens of an incomplete trailing group, ignored


class SegmentationCodebook(nn.Module):
    """Codebook tokens, the projection of their states to the decoder width, and token fusion phi.

    Args:
        hidden_size: H, the LLM width (must equal the LLM's).
        decoder_dim: D, the width of the pixel decoder's queries.
        num_scales: L, one token group per vision scale.
        tokens_per_scale: N, tokens in a group.
        fusion: ``"linear"`` learns phi as a linear map of the N projected states of a group (paper;
            initialised to their mean); ``"mean"`` averages them; ``"release"`` reproduces the released
            code, which sums a group's N states times 1/(L*N) (half the mean for L=2).
        token_template: format of the token strings, filled with 0..L*N-1.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        decoder_dim: int = 256,
        num_scales: int = 2,
        tokens_per_scale: int = 3,
        fusion: Literal["linear", "mean", "release"] = "linear",
        token_template: str = "[SEG{}]",
    ) -> None:
        super().__init__()
        if fusion not in ("linear", "mean", "release"):
            raise ValueError(f"fusion must be 'linear', 'mean' or 'release', got {fusion!r}")
        self.hidden_size = hidden_size
        self.decoder_dim = decoder_dim
        self.num_scales = num_scales
        self.tokens_per_scale = tokens_per_scale
        self.fusion = fusion
        self.tokens = codebook_token_strings(num_scales, tokens_per_scale, token_template)
        # the release's text_hidden_fcs: Linear(H, H) -> ReLU -> Linear(H, D), shared by all tokens
        self.project = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, decoder_dim)
        )
        self.fuse = None
        if fusion == "linear":
            fuse = torch.zeros(num_scales, tokens_per_scale * decoder_dim, decoder_dim)
            eye = torch.eye(decoder_dim) / tokens_per_scale
            fuse[:] = eye.repeat(tokens_per_scale, 1)  # starts as the mean of the N states
            self.fuse = nn.Parameter(fuse)  # (L, N*D, D)
            self.fuse_bias = nn.Parameter(torch.zeros(num_scales, decoder_dim))  # (L, D)
        self.register_buffer("token_ids", torch.empty(0, dtype=torch.long), persistent=False)

    @property
    def group_size(self) -> int:
        """Codebook tokens per target, L*N."""
        return self.num_scales * self.tokens_per_scale

    def bind(self, token_ids: list[int]) -> None:
        """Record the tokenizer ids of :attr:`tokens` (in order); they must be distinct."""
        if len(token_ids) != self.group_size or len(set(token_ids)) != self.group_size:
            raise ValueError(f"codebook tokens {self.tokens} must map to distinct ids, got {token_ids}")
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=self.token_ids.device)

    def gather(self, states: Tensor, token_ids: Tensor, strict: bool = True) -> GatheredTargets:
        """Collect the states that emitted codebook tokens, grouped into targets in text order.

        Args:
            states: (B, S, H) ``states[b, j]`` is the state that emitted ``token_ids[b, j]`` (for teacher
                forcing pass ``hidden[:, :-1]`` with ``ids[:, 1:]``).
            token_ids: (B, S) token ids.
            strict: raise if a sequence holds a count of codebook tokens that is not a multiple of L*N;
                otherwise ignore its incomplete trailing group and count, per sequence, the tokens dropped.

        Returns:
            The targets; a target's slots are filled by position within its group.
        """
        if self.token_ids.numel() == 0:
            raise RuntimeError("SegmentationCodebook.bind(token_ids) must be called before gather")
        is_code = torch.isin(token_ids, self.token_ids)  # (B, S)
        counts = is_code.sum(1)  # (B,)
        complete = counts // self.group_size  # (B,) whole targets per sequence
        dropped = counts - complete * self.group_size  # (B,)
        if strict and bool(dropped.any()):
            rows = torch.nonzero(counts % self.group_size).flatten().tolist()
            raise ValueError(
                f"sequences {rows} hold {counts[rows].tolist()} codebook tokens, not a multiple of "
                f"L*N = {self.group_size}"
            )
        rank = is_code.cumsum(1) - 1  # (B, S) index of each codebook token within its sequence
        keep = is_code & (rank < (complete * self.group_size)[:, None])
        rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major: text order within a sequence
        picked = states[rows, cols]  # (T*L*N, H)
        shape = (-1, self.num_scales, self.tokens_per_scale, states.shape[-1])
        return GatheredTargets(
            states=picked.reshape(shape),  # (T, L, N, H)
            batch_index=rows[:: self.group_size],  # (T,)
            dropped_tokens=dropped,
        )

    def forward(self, states: Tensor) -> Tensor:
        """Fuse each target's token states into one query per scale.

        Args:
            states: (T, L, N, H) from :meth:`gather`.

        Returns:
            (T, L, D) queries for the pixel decoder.
        """
        projected = self.project(states)  # (T, L, N, D)
        if self.fusion == "mean":
            return projected.mean(2)
        if self.fusion == "release":
            return projected.sum(2) / self.group_size
        flat = projected.flatten(2)  # (T, L, N*D)
        return torch.einsum("tlk,lkd->tld", flat, self.fuse) + self.fuse_bias  # (T, L, D)
