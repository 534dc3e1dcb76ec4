"""Tests of the two-way transformer and its parts, on hand-made values and symmetries."""

import math

import pytest
import torch
from torch import nn

from pixellm.model.transformer import MLP, Attention, LayerNorm2d, TwoWayBlock, TwoWayTransformer


def test_layer_norm_2d_matches_channels_last_layer_norm() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5)
    ln2d = LayerNorm2d(num_channels=6)
    ref = nn.LayerNorm(6, eps=1e-6)
    with torch.no_grad():
        for p in (ln2d.weight, ln2d.bias):
            p.normal_()
        ref.weight.copy_(ln2d.weight)
        ref.bias.copy_(ln2d.bias)
    expected = ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln2d(x), expected)


def test_mlp_applies_relu_between_layers_only() -> None:
    mlp = MLP(in_dim=1, hidden_dim=1, out_dim=1, num_layers=2)
    with torch.no_grad():
        mlp.layers[0].weight.fill_(1.0)
        mlp.layers[0].bias.fill_(0.0)
        mlp.layers[1].weight.fill_(-2.0)
        mlp.layers[1].bias.fill_(-1.0)
    x = torch.tensor([[-3.0], [2.0]])
    # relu(x) * -2 - 1: no ReLU after the last layer, so the output can be negative.
    torch.testing.assert_close(mlp(x), torch.tensor([[-1.0], [-5.0]]))
    assert len(MLP(in_dim=4, hidden_dim=8, out_dim=2, num_layers=3).layers) == 3


def test_attention_matches_hand_written_multi_head_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, downsample=2)  # inner width 4, head width 2
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    qh = attn.q_proj(q).view(3, 5, 2, 2).transpose(1, 2)
    kh = attn.k_proj(k).view(3, 7, 2, 2).transpose(1, 2)
    vh = attn.v_proj(v).view(3, 7, 2, 2).transpose(1, 2)
    weights = (qh @ kh.transpose(-1, -2) / math.sqrt(2)).softmax(-1)
    expected = attn.out_proj((weights @ vh).transpose(1, 2).reshape(3, 5, 4))
    torch.testing.assert_close(attn(q, k, v), expected)


def test_attention_rejects_widths_that_do_not_split_into_heads() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        Attention(dim=8, num_heads=3)


@pytest.mark.parametrize("first", [True, False])
def test_first_block_self_attention_has_no_residual_and_no_pe(first: bool) -> None:
    torch.manual_seed(0)
    block = TwoWayBlock(dim=8, num_heads=2, mlp_dim=16, attention_downsample=2, first=first)
    seen: dict[str, torch.Tensor] = {}
    block.norm1.register_forward_hook(lambda m, args, out: seen.update(norm1_in=args[0]))
    tokens, image = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    token_pe, image_pe = torch.randn(2, 3, 8), torch.randn(4, 8)
    block(tokens, image, token_pe, image_pe)
    if first:
        expected = block.self_attn(tokens, tokens, tokens)
    else:
        expected = tokens + block.self_attn(tokens + token_pe, tokens + token_pe, tokens)
    torch.testing.assert_close(seen["norm1_in"], expected)


def _transformer() -> TwoWayTransformer:
    torch.manual_seed(0)
    return TwoWayTransformer(depth=2, dim=16, num_heads=4, mlp_dim=32, attention_downsample=2)


def test_transformer_shapes_and_batch_independence() -> None:
    model = _transformer()
    image, pe, tokens = torch.randn(3, 16, 4, 5), torch.randn(16, 4, 5), torch.randn(3, 6, 16)
    out_tokens, out_image = model(image, pe, tokens)
    assert out_tokens.shape == (3, 6, 16)
    assert out_image.shape == (3, 16, 4, 5)
    # Sample 1 alone gives the same result as inside the batch: nothing leaks across the batch.
    one_tokens, one_image = model(image[1:2], pe, tokens[1:2])
    torch.testing.assert_close(one_tokens, out_tokens[1:2])
    torch.testing.assert_close(one_image, out_image[1:2])


def test_transformer_is_equivariant_to_token_order() -> None:
    # Tokens carry no position other than themselves: permuting them permutes their outputs and
    # leaves the image output unchanged.
    model = _transformer()
    image, pe, tokens = torch.randn(2, 16, 3, 3), torch.randn(16, 3, 3), torch.randn(2, 5, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out_tokens, out_image = model(image, pe, tokens)
    perm_tokens, perm_image = model(image, pe, tokens[:, perm])
    torch.testing.assert_close(perm_tokens, out_tokens[:, perm])
    torch.testing.assert_close(perm_image, out_image)


def test_transformer_uses_the_positional_encoding() -> None:
    model = _transformer()
    image, pe, tokens = torch.randn(1, 16, 3, 3), torch.randn(16, 3, 3), torch.randn(1, 5, 16)
    out_a, _ = model(image, pe, tokens)
    out_b, _ = model(image, pe.flip(-1), tokens)
    assert not torch.allclose(out_a, out_b)
