"""Vision-to-decoder projection p_V->D."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixellm.model.projection import VisionDecoderProjection


def test_projection_maps_channels_and_normalises_each_pixel():
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=12, out_channels=8, mlp_dim=16, embed_dim=10)
    out, small = proj([torch.randn(2, 12, 5, 7), torch.randn(2, 12, 3, 3)])
    assert out.shape == (2, 8, 5, 7) and small.shape == (2, 8, 3, 3)
    # the neck ends in LayerNorm2d (weight 1, bias 0 at init): every pixel's channels are standardised
    assert torch.allclose(out.mean(1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


def test_projection_is_pointwise_before_the_3x3_conv():
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=4, out_channels=8, mlp_dim=8, embed_dim=8)
    x = torch.randn(1, 4, 6, 6)
    y = x.clone()
    y[..., 0, 0] += 5.0  # change one pixel: only its 3x3 neighbourhood may move
    diff = (proj([x])[0] - proj([y])[0]).abs().sum(1)[0]
    assert diff[0, 0] > 0 and diff[:2, :2].ne(0).all()
    assert diff[2:, :].eq(0).all() and diff[:, 2:].eq(0).all()


def layer_by_layer(proj: VisionDecoderProjection, x: torch.Tensor) -> torch.Tensor:
    """The release's order: the token MLP, then every layer of the neck."""
    return proj.neck(proj.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(
    ("mlp_dim", "embed_dim", "out_channels", "product_cheaper"),
    [(64, 48, 4, True), (64, 4, 32, False)],  # E >> D as in the release; E << D, M
)
def test_projection_equals_the_layers_applied_in_turn(mlp_dim, embed_dim, out_channels, product_cheaper, grad):
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=5, out_channels=out_channels, mlp_dim=mlp_dim, embed_dim=embed_dim)
    for norm in (proj.neck[1], proj.neck[3]):  # non-trivial norms, so that every parameter counts
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    maps = [torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)]
    proj.double()
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
        outputs = proj(maps)
    for out, x in zip(outputs, maps, strict=True):
        assert torch.allclose(out, layer_by_layer(proj, x), rtol=1e-10, atol=1e-10)
    # the product (D, M) only at inference and where it needs fewer multiply-adds, else layer by layer
    tokens = 2 * (16 + 4)
    if product_cheaper and not grad:
        pointwise = mlp_dim * out_channels * (embed_dim + tokens)
    else:
        pointwise = tokens * (mlp_dim * embed_dim + embed_dim * out_channels)
    macs = tokens * 5 * mlp_dim + pointwise + tokens * out_channels * out_channels * 9
    assert counter.get_total_flops() == 2 * macs


def release_sized(seed: int = 0) -> VisionDecoderProjection:
    """E >> D as in the release, so that the product is used without gradients."""
    torch.manual_seed(seed)
    return VisionDecoderProjection(in_channels=5, out_channels=4, mlp_dim=64, embed_dim=48).double()


def test_eval_mode_forms_the_product_once_per_evaluation():
    proj, maps = release_sized().eval(), [torch.randn(2, 5, 4, 4, dtype=torch.float64)]
    per_call = 32 * (5 * 64 + 64 * 4 + 4 * 4 * 9)  # 32 tokens: first layer, product, 3x3 conv (MACs)
    with torch.no_grad():
        flops = []
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                out = proj(maps)[0]
            flops.append(counter.get_total_flops())
    assert flops == [2 * (per_call + 4 * 48 * 64), 2 * per_call, 2 * per_call]  # D E M only the first time
    assert torch.allclose(out, layer_by_layer(proj, maps[0]), rtol=1e-10, atol=1e-10)


def test_the_kept_product_follows_new_weights():
    proj, maps = release_sized().eval(), [torch.randn(1, 5, 4, 4, dtype=torch.float64)]
    with torch.no_grad():
        before = proj(maps)[0]
        proj.load_state_dict(release_sized(seed=1).state_dict())  # copied in place: a new version of each weight
        loaded = proj(maps)[0]
        proj.mlp[2].weight.data.mul_(2)  # invisible to autograd's version counter ...
        proj.eval()  # ... so seen after eval(), which Lightning calls at the start of every evaluation
        doubled = proj(maps)[0]
    assert not torch.allclose(before, loaded)
    assert torch.allclose(loaded, layer_by_layer(release_sized(seed=1), maps[0]), rtol=1e-10, atol=1e-10)
    assert torch.allclose(doubled, layer_by_layer(proj, maps[0]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(doubled, loaded)


def test_nothing_kept_is_used_in_training_mode():
    """Lightning restores training mode after an evaluation by setting ``training``, not by ``train()``."""
    proj, maps = release_sized().eval(), [torch.randn(1, 5, 4, 4, dtype=torch.float64)]
    with torch.no_grad():
        proj(maps)  # an evaluation keeps the product
        for module in proj.modules():
            module.training = True  # as lightning's _ModuleMode.restore does
        proj.mlp[2].weight.data.mul_(2)  # a fused optimizer step does not count as a new version either
        out, expected = proj(maps)[0], layer_by_layer(proj, maps[0])
        proj.eval()
        proj.mlp[2].weight.data.mul_(2)
        later = proj(maps)[0]  # the next evaluation starts with eval(): formed anew
        expected_later = layer_by_layer(proj, maps[0])
    proj(maps)  # a forward with gradients, in eval mode (a module trained in eval mode) ...
    with torch.no_grad():
        proj.mlp[2].weight.data.mul_(2)  # ... and its optimizer step
        last = proj(maps)[0]
        expected_last = layer_by_layer(proj, maps[0])
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(later, expected_later, rtol=1e-10, atol=1e-10)
    assert torch.allclose(last, expected_last, rtol=1e-10, atol=1e-10)


def test_a_product_formed_under_autocast_is_not_reused_without_it():
    torch.manual_seed(0)
    proj = VisionDecoderProjection(in_channels=5, out_channels=4, mlp_dim=64, embed_dim=48).eval()
    maps = [torch.randn(1, 5, 4, 4)]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = proj(maps)[0]
        full = proj(maps)[0]
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    reference = layer_by_layer(proj, maps[0])
    assert (full - reference).abs().max() < 1e-4 < (low.float() - reference).abs().max() < 0.2
