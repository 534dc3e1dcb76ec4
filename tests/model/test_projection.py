"""Vision-to-decoder projection p_V->D."""

import torch

from pixellm.model.projection import VisionDecoderProjection


def test_projection_maps_channels_and_normalises_each_pixel():
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=12, out_channels=8, mlp_dim=16, embed_dim=10)
    out = proj(torch.randn(2, 12, 5, 7))
    assert out.shape == (2, 8, 5, 7)
    # the neck ends in LayerNorm2d (weight 1, bias 0 at init): every pixel's channels are standardised
    assert torch.allclose(out.mean(1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


def test_projection_is_pointwise_before_the_3x3_conv():
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=4, out_channels=8, mlp_dim=8, embed_dim=8)
    x = torch.randn(1, 4, 6, 6)
    y = x.clone()
    y[..., 0, 0] += 5.0  # change one pixel: only its 3x3 neighbourhood may move
    diff = (proj(x) - proj(y)).abs().sum(1)[0]
    assert diff[0, 0] > 0 and diff[:2, :2].ne(0).all()
    assert diff[2:, :].eq(0).all() and diff[:, 2:].eq(0).all()
