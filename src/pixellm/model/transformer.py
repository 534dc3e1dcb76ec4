"""A SAM-style two-way transformer: prompt tokens and image features attend to each other.

Each block updates the tokens (self-attention, cross-attention to the image, an MLP) and then
the image (cross-attention to the tokens); a last token-to-image attention finishes the tokens.
Positional encodings are re-added before every attention (the tokens act as their own encoding),
never to the values. Parameter names follow Segment Anything's mask-decoder transformer
(`self_attn`, `cross_attn_token_to_image`, `q_proj`, ...) so released weights map by name, except
the token MLP, whose layers are `mlp.layers.{0,1}` here (`mlp.lin{1,2}` there).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) map, with a learned affine."""

    def __init__(self, *, num_channels: int, eps: float = 1e-6) -> None:
        """Create the layer.

        Args:
            num_channels: C, the number of channels normalised together at each pixel.
            eps: added to the variance before the square root.
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise `x` of shape (B, C, H, W) over C; returns the same shape.

        One fused `layer_norm` kernel on the channels-last view (biased variance, as SAM's LayerNorm2d).
        """
        channels_last = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        out = F.layer_norm(channels_last, (x.shape[1],), self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)  # (B, C, H, W)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (none after the last)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        """Create the MLP.

        Args:
            in_dim: input width.
            hidden_dim: width of every hidden layer.
            out_dim: output width.
            num_layers: number of linear layers, at least 1.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to the last dimension of `x` (..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    """Multi-head attention whose inner width is `dim // downsample` (SAM's downsampled attention)."""

    def __init__(self, *, dim: int, num_heads: int, downsample: int = 1) -> None:
        """Create the projections.

        Args:
            dim: width of queries, keys, values and output.
            num_heads: number of heads; must divide `dim // downsample`.
            downsample: the inner width is `dim // downsample`.
        """
        super().__init__()
        inner = dim // downsample
        if inner * downsample != dim or inner % num_heads != 0:
            raise ValueError(
                f"Attention: dim={dim} / downsample={downsample} must be an integer divisible "
                f"by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, inner) -> (B, heads, N, inner / heads)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attend from `q` (B, Nq, dim) to `k`, `v` (B, Nk, dim); returns (B, Nq, dim)."""
        q = self._heads(self.q_proj(q))  # (B, heads, Nq, inner / heads)
        k = self._heads(self.k_proj(k))  # (B, heads, Nk, inner / heads)
        v = self._heads(self.v_proj(v))  # (B, heads, Nk, inner / heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, inner / heads)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Nq, dim)


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample: int,
        first: bool,
    ) -> None:
        """Create the block.

        Args:
            dim: width of tokens and image features.
            num_heads: heads of every attention.
            mlp_dim: hidden width of the token MLP.
            attention_downsample: inner-width divisor of the two cross-attentions.
            first: the first block's self-attention sees the tokens without their positional
                encoding and replaces them (no residual), as SAM does.
        """
        super().__init__()
        self.first = first
        self.self_attn = Attention(dim=dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(
            dim=dim, num_heads=num_heads, downsample=attention_downsample
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(in_dim=dim, hidden_dim=mlp_dim, out_dim=dim, num_layers=2)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(
            dim=dim, num_heads=num_heads, downsample=attention_downsample
        )
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self, tokens: Tensor, image: Tensor, token_pe: Tensor, image_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Update tokens (B, N, D) and image (B, HW, D) given their encodings (broadcastable)."""
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        image_keys = image + image_pe  # (B, HW, D)
        attn = self.cross_attn_token_to_image(tokens + token_pe, image_keys, image)  # (B, N, D)
        tokens = self.norm2(tokens + attn)
        tokens = self.norm3(tokens + self.mlp(tokens))
        attn = self.cross_attn_image_to_token(image_keys, tokens + token_pe, tokens)  # (B, HW, D)
        image = self.norm4(image + attn)
        return tokens, image


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a final token->image attention and LayerNorm on the tokens."""

    def __init__(
        self,
        *,
        depth: int = 2,
        dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
    ) -> None:
        """Create the transformer (defaults: SAM's and PixelLM's mask decoder).

        Args:
            depth: number of two-way blocks.
            dim: width of tokens and image features.
            num_heads: heads of every attention.
            mlp_dim: hidden width of the token MLPs.
            attention_downsample: inner-width divisor of the token<->image attentions.
        """
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(
                dim=dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample=attention_downsample,
                first=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            dim=dim, num_heads=num_heads, downsample=attention_downsample
        )
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Let tokens and image attend to each other.

        Args:
            image: (B, D, H, W) image features.
            image_pe: (D, H, W) positional encoding of the image grid, shared by the batch.
            tokens: (B, N, D) tokens; they also serve as their own positional encoding.

        Returns:
            The updated tokens (B, N, D) and image features (B, D, H, W).
        """
        b, d, h, w = image.shape
        image_pe = image_pe.flatten(1).transpose(0, 1)  # (HW, D)
        token_pe = tokens  # (B, N, D)
        x = image.flatten(2).transpose(1, 2)  # (B, HW, D)
        for layer in self.layers:
            tokens, x = layer(tokens, x, token_pe, image_pe)
        attn = self.final_attn_token_to_image(tokens + token_pe, x + image_pe, x)
        tokens = self.norm_final_attn(tokens + attn)  # (B, N, D)
        return tokens, x.transpose(1, 2).reshape(b, d, h, w)
