"""Pixel decoders: the abstract `PixelDecoder` contract and PixelLM's cascaded decoder (Sec. 3.1).

A research variant is one `PixelDecoder` subclass that implements `forward`; `postprocess` (crop
and resize to the original images) is shared.
"""

import abc
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixellm.model.transformer import MLP, LayerNorm2d, TwoWayTransformer


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, C, H, W) to `size` (align_corners=False); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def modulate(features: Tensor, mask_logits: Tensor) -> Tensor:
    """Eq. 1: gate features with the previous scale's mask, `f * (sigmoid(m) + 1)`.

    Args:
        features: (T, D, h, w) per-target image features.
        mask_logits: (T, C, h', w') mask logits of the previous scale; C is 1 for the cascaded
            decoder (the release averages over C before the sigmoid, which we do too).

    Returns:
        (T, D, h, w) features scaled by a factor in (1, 2) at each pixel: about 1 where the
        mask is confidently off, 1.5 at logit 0, about 2 where it is confidently on.
    """
    gate = mask_logits.mean(dim=1, keepdim=True)  # (T, 1, h', w')
    gate = _resize(gate, tuple(features.shape[-2:])).sigmoid() + 1  # (T, 1, h, w)
    return features * gate


class PixelDecoder(nn.Module, abc.ABC):
    """Turns per-scale image features and fused codebook embeddings into mask logits.

    Subclasses implement `forward` only. Attributes: `num_scales` (L), `dim` (D, the width of
    features and queries).
    """

    def __init__(self, *, num_scales: int, dim: int) -> None:
        """Record the contract's sizes.

        Args:
            num_scales: L, the number of feature scales and of queries per target.
            dim: D, the width of features and queries.
        """
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"{type(self).__name__}: num_scales must be >= 1, got {num_scales}")
        self.num_scales = num_scales
        self.dim = dim

    @abc.abstractmethod
    def forward(self, features: Sequence[Tensor], queries: Tensor, batch_index: Tensor) -> Tensor:
        """Decode one mask per target.

        Args:
            features: L tensors (B, D, h, w), scale 0 first (the deepest/global CLIP layer,
                decoded first), all on the same patch grid.
            queries: (T, L, D) fused codebook embedding of each target for each scale, targets
                in text order. T may be 0.
            batch_index: (T,) long, which image each target belongs to.

        Returns:
            (T, H_out, W_out) mask logits over the padded square input image, at any resolution
            (`postprocess` resizes); (0, H_out, W_out) when T is 0.
        """

    def postprocess(
        self,
        logits: Tensor,
        batch_index: Tensor,
        input_size: int,
        resized_sizes: Tensor,
        original_sizes: Tensor,
    ) -> list[Tensor]:
        """Map decoder logits back onto each original image.

        Images that share their resized and original sizes (all of them, for a square dataset) are cropped
        and resized together, in one call per distinct size.

        Args:
            logits: (T, H_out, W_out) output of `forward`.
            batch_index: (T,) long, which image each target belongs to.
            input_size: side of the padded square model input, in pixels.
            resized_sizes: (B, 2) (h, w) of each image after resizing, before bottom/right padding.
            original_sizes: (B, 2) (H, W) of each original image.

        Returns:
            B tensors (K_b, H_b, W_b) of logits; the targets of image b in text order (K_b may be 0).
        """
        num_images = len(resized_sizes)
        order = torch.argsort(batch_index, stable=True)  # targets grouped by image, text order kept
        counts = torch.bincount(batch_index, minlength=num_images).tolist()  # K_b
        logits = _resize(logits[order, None], (input_size, input_size))  # (T, 1, S, S)
        per_image = logits.split(counts)  # B x (K_b, 1, S, S)
        # images with the same resized and original sizes are cropped and resized in one call
        same_sizes: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for b, sizes in enumerate(torch.cat([resized_sizes, original_sizes], dim=1).tolist()):
            same_sizes[tuple(sizes)].append(b)
        masks: dict[int, Tensor] = {}
        for (h, w, height, width), images in same_sizes.items():
            group = logits if len(images) == num_images else torch.cat([per_image[b] for b in images])
            resized = _resize(group[:, :, :h, :w], (height, width))[:, 0]  # (K_group, H_b, W_b)
            for b, mask in zip(images, resized.split([counts[b] for b in images]), strict=True):
                masks[b] = mask  # (K_b, H_b, W_b)
        return [masks[b] for b in range(num_images)]


class FourierPositionalEncoding(nn.Module):
    """Random-Fourier encoding of pixel centres in [-1, 1]^2 (SAM's PositionEmbeddingRandom)."""

    gaussian: Tensor

    def __init__(self, *, dim: int, scale: float = 1.0) -> None:
        """Draw the frequency matrix.

        Args:
            dim: output channels (even): sines and cosines of dim / 2 random projections.
            scale: standard deviation of the Gaussian frequencies.
        """
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierPositionalEncoding: dim must be even, got {dim}")
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def forward(self, height: int, width: int) -> Tensor:
        """Return the (dim, height, width) encoding of a height x width grid."""
        kw = {"device": self.gaussian.device, "dtype": self.gaussian.dtype}
        y = (torch.arange(height, **kw) + 0.5) / height
        x = (torch.arange(width, **kw) + 0.5) / width
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        proj = 2 * math.pi * (2 * grid - 1) @ self.gaussian  # (h, w, dim / 2)
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(2, 0, 1)  # (dim, h, w)


def _upsampler(*, in_dim: int, out_dim: int, times: int) -> nn.Sequential:
    """`times` stages of stride-2 transposed conv -> LayerNorm2d -> GELU (empty: identity)."""
    stages = []
    for i in range(times):
        conv = nn.ConvTranspose2d(in_dim if i == 0 else out_dim, out_dim, kernel_size=2, stride=2)
        stages.append(nn.Sequential(conv, LayerNorm2d(num_channels=out_dim), nn.GELU()))
    return nn.Sequential(*stages)


class CascadedPixelDecoder(PixelDecoder):
    """PixelLM's decoder: one two-way transformer per scale, each scale gated by the last (Eq. 1).

    Scale l decodes features upsampled 2^l times (scale 0: the patch grid h x w) into logits m^l at
    2^(l+1) h x 2^(l+1) w; the features of scale l >= 1 are first modulated by m^(l-1). The output
    is `sum_l gamma_l * resize(m^l)` at the finest resolution, (T, 2^L h, 2^L w).

    Tokens per target and scale: [IoU token, mask tokens, the target's query] + level embedding.
    Only mask token 0's output makes the mask; the IoU token and other mask tokens still take part
    in attention. The hypernetworks of mask tokens 1.. are kept (frozen, never used) so that the
    released weights load by name: the release's `iou_prediction_head` has no counterpart here.
    """

    def __init__(
        self,
        *,
        num_scales: int = 2,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
        num_mask_tokens: int = 4,
        hypernet_layers: int = 3,
        learn_scale_weights: bool = True,
    ) -> None:
        """Create the decoder (defaults: the release).

        Args:
            num_scales: L, the number of feature scales.
            dim: D, width of features, queries and transformers; divisible by 8.
            depth: two-way blocks per transformer.
            num_heads: attention heads.
            mlp_dim: hidden width of the transformer token MLPs.
            attention_downsample: inner-width divisor of the token<->image attentions.
            num_mask_tokens: mask tokens in every token set (the release: 4, only the first used).
            hypernet_layers: linear layers of each hypernetwork MLP (D -> ... -> D / 8).
            learn_scale_weights: learn gamma as a softmax over L logits starting at 1/L (the
                paper); False keeps gamma fixed at 1/L (the release).
        """
        super().__init__(num_scales=num_scales, dim=dim)
        if dim % 8:
            raise ValueError(f"CascadedPixelDecoder: dim must be divisible by 8, got {dim}")
        self.transformers = nn.ModuleList(
            TwoWayTransformer(
                depth=depth,
                dim=dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample=attention_downsample,
            )
            for _ in range(num_scales)
        )
        self.positional_encodings = nn.ModuleList(
            FourierPositionalEncoding(dim=dim) for _ in range(num_scales)
        )
        # feature_upsamplers[l] upsamples 2^l times; [0] is the identity.
        self.feature_upsamplers = nn.ModuleList(
            _upsampler(in_dim=dim, out_dim=dim, times=level) for level in range(num_scales)
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        self.level_embed = nn.Embedding(num_scales, dim)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.output_upscaling = _upsampler(in_dim=dim, out_dim=dim // 8, times=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(in_dim=dim, hidden_dim=dim, out_dim=dim // 8, num_layers=hypernet_layers)
            for _ in range(num_mask_tokens)
        )
        self.output_hypernetworks_mlps[1:].requires_grad_(False)
        self.learn_scale_weights = learn_scale_weights
        if learn_scale_weights:
            self.scale_logits = nn.Parameter(torch.zeros(num_scales))
        else:
            self.register_buffer(
                "fixed_scale_weights", torch.full((num_scales,), 1 / num_scales), persistent=False
            )

    def scale_weights(self) -> Tensor:
        """The (L,) weights gamma of the scales' logits; they are positive and sum to 1."""
        if self.learn_scale_weights:
            return self.scale_logits.softmax(dim=0)
        return self.fixed_scale_weights

    def _check(self, features: Sequence[Tensor], queries: Tensor, batch_index: Tensor) -> None:
        """Raise a ValueError naming the argument whose shape breaks the contract."""
        name = type(self).__name__
        if len(features) != self.num_scales:
            raise ValueError(
                f"{name}: got {len(features)} feature maps, expected {self.num_scales}"
            )
        for level, f in enumerate(features):
            if f.dim() != 4 or f.shape[1] != self.dim or f.shape != features[0].shape:
                raise ValueError(
                    f"{name}: features[{level}] has shape {tuple(f.shape)}; every scale must be "
                    f"(B, {self.dim}, h, w) with the same B, h, w as features[0] {tuple(features[0].shape)}"
                )
        if queries.dim() != 3 or queries.shape[1:] != (self.num_scales, self.dim):
            raise ValueError(
                f"{name}: queries has shape {tuple(queries.shape)}, expected (T, {self.num_scales}, {self.dim})"
            )
        if batch_index.shape != queries.shape[:1]:
            raise ValueError(
                f"{name}: batch_index has shape {tuple(batch_index.shape)}, expected ({queries.shape[0]},)"
            )

    def _decode_scale(self, level: int, image: Tensor, query: Tensor) -> Tensor:
        """Run scale `level` on per-target features (T, D, h, w) and queries (T, D) -> (T, 1, 2h, 2w)."""
        t, _, h, w = image.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (1 + M, D)
        output_tokens = output_tokens.expand(t, -1, -1)  # (T, 1 + M, D)
        tokens = torch.cat([output_tokens, query[:, None]], dim=1)  # (T, 2 + M, D)
        tokens = tokens + self.level_embed.weight[level]
        image = image + self.no_mask_embed.weight[0, :, None, None]  # dense "no mask" prompt
        pe = self.positional_encodings[level](h, w).to(image.dtype)  # (D, h, w)
        tokens, image = self.transformers[level](image, pe, tokens)  # (T, 2 + M, D), (T, D, h, w)
        pixels = self.output_upscaling(image)  # (T, D / 8, 2h, 2w)
        hyper = self.output_hypernetworks_mlps[0](tokens[:, 1])  # (T, D / 8)
        return torch.einsum("tc,tchw->thw", hyper, pixels)[:, None]  # (T, 1, 2h, 2w)

    def forward(self, features: Sequence[Tensor], queries: Tensor, batch_index: Tensor) -> Tensor:
        """Decode the scales in turn; see `PixelDecoder.forward`. Returns (T, 2^L h, 2^L w)."""
        self._check(features, queries, batch_index)
        masks = []  # m^l, (T, 1, 2^(l+1) h, 2^(l+1) w)
        for level, f in enumerate(features):
            image = self.feature_upsamplers[level](f)[batch_index]  # (T, D, 2^l h, 2^l w)
            if masks:
                image = modulate(image, masks[-1])
            masks.append(self._decode_scale(level, image, queries[:, level]))
        size = tuple(masks[-1].shape[-2:])
        stacked = torch.cat([_resize(m, size) for m in masks], dim=1)  # (T, L, H_out, W_out)
        gamma = self.scale_weights().to(stacked.dtype)  # (L,)
        return torch.einsum("l,tlhw->thw", gamma, stacked)  # (T, H_out, W_out)
