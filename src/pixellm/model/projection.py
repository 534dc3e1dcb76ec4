"""Vision-to-decoder projection p_V->D (Sec. 3.1): f_img^l = p_V->D(I_img^l), shared by all scales.

Structure of the release: a token MLP Linear(C, M) -> GELU -> Linear(M, E), then a convolutional
neck Conv1x1(E -> D, no bias) -> LayerNorm2d -> Conv3x3(D -> D, no bias) -> LayerNorm2d.
(The release has M = 2H and E = H, the LLM width; here both are free.)

Linear(M, E) and Conv1x1(E -> D) are two linear maps in a row, so at inference (no gradient) they
are applied as their product, one (D, M) matrix, whenever that needs fewer multiply-adds: at the
release's sizes (M = 8192, E = 4096, D = 256 for 7B) that cuts the projection's FLOPs by 2/3. In eval
mode the product is formed once and kept until ``eval()`` or ``train()`` is next called (Lightning
calls ``eval()`` at the start of every evaluation) or its weights are replaced or changed through
autograd-visible ops (``load_state_dict`` included); a forward in training mode or with gradients
drops it, as weights then change by optimizer steps that such checks cannot see (fused AdamW,
``.data`` writes): it lives across consecutive no-gradient calls in eval mode only.
The parameters are those of the release, so its weights load unchanged; the output is the same up
to rounding. Training keeps the layer-by-layer order. Its gradients are the same up to rounding, but the
default config's quick start trained through the product ended at val gIoU 58.9 and 56.0 (seeds 0, 1)
against 61.7-64.1 for three layer-by-layer runs; rounding alone moves that run by several points, so
this is not conclusive, and we keep the release's order where it cannot cost a result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixellm.model.transformer import LayerNorm2d


class VisionDecoderProjection(nn.Module):
    """Maps the L vision feature maps (B, C, h_l, w_l) to decoder features (B, D, h_l, w_l), same weights for all.

    Args:
        in_channels: C, channels of the vision encoder's maps.
        out_channels: D, the pixel decoder width.
        mlp_dim: M, hidden width of the token MLP.
        embed_dim: E, output width of the token MLP (input of the neck).
    """

    def __init__(self, *, in_channels: int, out_channels: int = 256, mlp_dim: int = 2048, embed_dim: int = 1024) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, embed_dim))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_channels, kernel_size=1, bias=False),
            LayerNorm2d(num_channels=out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(num_channels=out_channels),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self._product: tuple[tuple, Tensor, Tensor] | None = None  # (what it was formed from, (D, M), (D,)); eval mode

    def train(self, mode: bool = True) -> VisionDecoderProjection:
        self._product = None  # the weights may have changed since it was formed (module docstring)
        return super().train(mode)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """L tensors (B, C, h_l, w_l) -> L tensors (B, D, h_l, w_l)."""
        expand, activation, _ = self.mlp
        hidden = [activation(expand(f.permute(0, 2, 3, 1))) for f in features]  # L x (B, h, w, M)
        _, first_norm, conv, second_norm = self.neck
        return [second_norm(conv(first_norm(x.permute(0, 3, 1, 2)))) for x in self._contract(hidden)]  # L x (B, D, h, w)

    def _contract(self, hidden: list[Tensor]) -> list[Tensor]:
        """Linear(M, E) then Conv1x1(E -> D) on every token of every map: L x (B, h, w, M) -> L x (B, h, w, D).

        Without a gradient to compute, applied as their product when that needs fewer multiply-adds,
        D E M (forming it, unless kept from an earlier call in eval mode) + T M D < T (M E + E D), T the
        tokens of all maps (hence one call for all scales); else one after the other (module docstring).
        """
        linear, pointwise = self.mlp[2], self.neck[0].weight.flatten(1)  # Linear(M, E); (D, E)
        if self.training or torch.is_grad_enabled():
            self._product = None  # the weights may change from here on (module docstring)
        if torch.is_grad_enabled():
            return [F.linear(linear(x), pointwise) for x in hidden]
        (dim, embed), mlp = pointwise.shape, linear.in_features
        tokens = sum(x[..., 0].numel() for x in hidden)
        weights = (linear.weight, linear.bias, pointwise)
        identity = (hidden[0].dtype, *((t.data_ptr(), t._version, t.device, t.dtype) for t in weights))  # autocast: dtype
        kept = self._product is not None and self._product[0] == identity
        forming = 0 if kept else dim * embed * mlp
        if forming + tokens * mlp * dim >= tokens * (mlp * embed + embed * dim):
            return [F.linear(linear(x), pointwise) for x in hidden]
        product = self._product if kept else (identity, pointwise @ linear.weight, pointwise @ linear.bias)  # (D, M), (D,)
        if not self.training:
            self._product = product
        return [F.linear(x, *product[1:]) for x in hidden]
