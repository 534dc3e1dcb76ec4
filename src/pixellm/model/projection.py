"""Vision-to-decoder projection p_V->D (Sec. 3.1): f_img^l = p_V->D(I_img^l), shared by all scales.

Structure of the release: a token MLP Linear(C, M) -> GELU -> Linear(M, E), then a convolutional
neck Conv1x1(E -> D, no bias) -> LayerNorm2d -> Conv3x3(D -> D, no bias) -> LayerNorm2d.
(The release has M = 2H and E = H, the LLM width; here both are free.)
"""

from __future__ import annotations

from torch import Tensor, nn

from pixellm.model.transformer import LayerNorm2d


class VisionDecoderProjection(nn.Module):
    """Maps vision features (B, C, h, w) to decoder features (B, D, h, w).

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

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, D, h, w)."""
        tokens = self.mlp(features.permute(0, 2, 3, 1))  # (B, h, w, E)
        return self.neck(tokens.permute(0, 3, 1, 2))  # (B, D, h, w)
