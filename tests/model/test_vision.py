"""Vision encoders: the right layers, tokens and order; position resizing; loading; freezing."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from pixellm.model.vision import (
    CLIPVisionEncoder,
    TimmVisionEncoder,
    interpolate_position_table,
    valid_cells,
)

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=4,
    patch_size=8,
    image_size=32,
)
TINY_VIT = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)


def tiny_clip(**kwargs) -> CLIPVisionEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("feature_layers", [-2, 1])
    return CLIPVisionEncoder(config=TINY_CLIP, **kwargs)


def tiny_timm(**kwargs) -> TimmVisionEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("feature_layers", [-2, -4])
    return TimmVisionEncoder(
        model_name="vit_tiny_patch16_224", image_size=64, model_kwargs=TINY_VIT, **kwargs
    )


def full_clip_like(encoder: CLIPVisionEncoder) -> CLIPVisionModel:
    """An untruncated stock CLIPVisionModel with the encoder's weights and resized table."""
    config = CLIPVisionConfig(**{**TINY_CLIP, "image_size": encoder.image_size})
    model = CLIPVisionModel(config).eval()
    result = model.load_state_dict(encoder.model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith("encoder.layers.3.") for k in result.missing_keys
    )
    return model


# --------------------------------------------------------------------------- position table


def test_position_table_is_identity_at_unchanged_size():
    table = torch.randn(1 + 16, 8)
    assert torch.equal(interpolate_position_table(table, 4), table)
    assert torch.equal(interpolate_position_table(table, 4, release_quirk=True), table)


def test_position_table_keeps_constants_and_class_row_at_twice_the_grid():
    table = torch.full((1 + 16, 8), 0.25)
    table[0] = torch.arange(8.0)
    new = interpolate_position_table(table, 8)
    assert new.shape == (1 + 64, 8)
    assert torch.equal(new[0], table[0])
    assert torch.allclose(new[1:], torch.full((64, 8), 0.25))


def test_position_table_interpolates_row_major_grid():
    # one channel holding the column index x on a 2x2 grid -> 4x4: bilinear, align_corners=False
    table = torch.tensor([[9.0], [0.0], [1.0], [0.0], [1.0]])  # class, (0,0), (0,1), (1,0), (1,1)
    new = interpolate_position_table(table, 4)
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(new[1:, 0].reshape(4, 4), row.expand(4, 4))
    assert new[0, 0] == 9.0


def test_release_quirk_matches_hand_written_reference():
    torch.manual_seed(0)
    g, new_g, dim = 3, 5, 4
    table = torch.randn(1 + g * g, dim)
    # the released PixelLM code, verbatim in substance
    cls = table[-1:]
    grid = table[:-1].permute(1, 0).view(1, dim, g, g)
    grid = torch.nn.functional.interpolate(
        grid, (new_g, new_g), mode="bilinear", align_corners=False
    )[0]
    expected = torch.cat((grid.flatten(-2).permute(1, 0), cls), dim=0)
    quirk = interpolate_position_table(table, new_g, release_quirk=True)
    assert torch.allclose(quirk, expected)
    assert not torch.allclose(quirk, interpolate_position_table(table, new_g))


def test_position_table_rejects_non_square():
    with pytest.raises(ValueError, match="1 \\+ g\\*g"):
        interpolate_position_table(torch.randn(6, 2), 3)


# --------------------------------------------------------------------------- CLIP


def test_clip_maps_equal_stock_hidden_states_at_new_size():
    encoder = tiny_clip(image_size=64)
    assert (encoder.grid_size, encoder.out_channels, encoder.num_scales) == (8, 32, 2)
    assert len(encoder.model.encoder.layers) == 3  # layer 4 cannot change hidden state -2
    full = full_clip_like(encoder)
    x = torch.randn(2, 3, 64, 64)
    maps = encoder(x)
    hidden = full(pixel_values=x, output_hidden_states=True).hidden_states  # 5 x (2, 65, 32)
    for got, index in zip(maps, [-2, 1], strict=True):
        assert got.shape == (2, 32, 8, 8)
        expected = hidden[index][:, 1:].reshape(2, 8, 8, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the token at grid (r, c) is patch r * 8 + c of the sequence (class token at 0)
    torch.testing.assert_close(maps[0][1, :, 2, 5], hidden[-2][1, 1 + 2 * 8 + 5], rtol=0, atol=1e-6)


def test_clip_default_layers_on_deep_enough_model():
    torch.manual_seed(0)
    encoder = CLIPVisionEncoder(config={**TINY_CLIP, "num_hidden_layers": 12})
    assert encoder.layers == [11, 2]  # hidden_states has 13 entries
    assert len(encoder.model.encoder.layers) == 11


def test_clip_position_table_untouched_at_unchanged_size():
    torch.manual_seed(0)
    stock = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    encoder = tiny_clip()
    assert encoder.image_size == 32 and encoder.grid_size == 4
    assert torch.equal(
        encoder.model.embeddings.position_embedding.weight,
        stock.embeddings.position_embedding.weight,
    )


def test_clip_resized_table_matches_function_and_quirk_changes_output():
    stock_table = tiny_clip().model.embeddings.position_embedding.weight
    plain, quirk = tiny_clip(image_size=64), tiny_clip(image_size=64, release_position_quirk=True)
    assert plain.model.config.image_size == 64
    assert plain.model.embeddings.position_ids.tolist() == [list(range(65))]
    assert torch.equal(
        plain.model.embeddings.position_embedding.weight, interpolate_position_table(stock_table, 8)
    )
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(plain(x)[0], quirk(x)[0])


def test_clip_loads_local_pretrained_directory(tmp_path: Path):
    torch.manual_seed(0)
    stock = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    stock.save_pretrained(tmp_path)
    encoder = CLIPVisionEncoder(pretrained=str(tmp_path), feature_layers=[-1])
    loaded = encoder.model.state_dict()
    for name, value in stock.state_dict().items():
        assert torch.equal(loaded[name], value), name
    stock.to(torch.bfloat16).save_pretrained(tmp_path)  # a half-precision file loads as float32
    assert {p.dtype for p in CLIPVisionEncoder(pretrained=str(tmp_path), feature_layers=[-1]).parameters()} == {
        torch.float32
    }


def test_clip_rejects_missing_directory_and_bad_arguments(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPVisionEncoder(pretrained=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="exactly one"):
        CLIPVisionEncoder()
    with pytest.raises(ValueError, match="multiple of the CLIP patch size 8"):
        tiny_clip(image_size=60)


def test_clip_bad_layer_names_index_and_depth():
    with pytest.raises(ValueError, match=r"feature_layers\[1\] = -11 .* 4-layer CLIP"):
        tiny_clip(feature_layers=[-2, -11])


def test_clip_frozen_has_no_grad_and_stays_in_eval():
    encoder = tiny_clip()
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    maps = encoder(torch.randn(1, 3, 32, 32))
    assert all(m.grad_fn is None and not m.requires_grad for m in maps)


def test_clip_trainable_gets_gradients_at_patch_embedding():
    encoder = tiny_clip(trainable=True)
    encoder.train()
    assert encoder.model.training
    sum(m.sum() for m in encoder(torch.randn(1, 3, 32, 32))).backward()
    grad = encoder.model.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_clip_rejects_wrong_input_size():
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        tiny_clip(image_size=64, feature_layers=[-2])(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- timm


def test_valid_cells_are_the_release_nearest_resize_of_the_pixel_mask():
    sizes = torch.tensor([[100, 448], [448, 30], [448, 448]])
    patches = valid_cells(sizes, 448, 32)  # 14-pixel patches: row i valid iff 14 i < 100
    assert patches.shape == (3, 32, 32)
    assert patches[0].sum(1).tolist() == [32] * 8 + [0] * 24 and patches[1].sum(0).tolist() == [32] * 3 + [0] * 29
    tokens = valid_cells(sizes, 448, 16)  # the LLM's 16 x 16: 28-pixel cells
    assert tokens[0].sum(1).tolist() == [16] * 4 + [0] * 12 and bool(tokens[2].all())
    # the release's two nearest resizes, pixels -> 32 x 32 -> 16 x 16
    pixels = torch.zeros(3, 1, 448, 448)
    for b, (h, w) in enumerate(sizes.tolist()):
        pixels[b, :, :h, :w] = 1
    grid = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="nearest")
    assert torch.equal(grid[:, 0].bool(), patches)
    assert torch.equal(torch.nn.functional.interpolate(grid, size=(16, 16), mode="nearest")[:, 0].bool(), tokens)
    assert torch.equal(valid_cells(sizes, 448, 16, patch_grid=32), tokens)
    # at 336 px (a 24 x 24 grid) pooled to 16 x 16 the two resizes differ from one: h = 15 is a case
    heights = torch.arange(1, 337)
    sizes = torch.stack([heights, torch.full_like(heights, 336)], 1)
    pixels = (torch.arange(336)[None, :, None] < heights[:, None, None]).float()[:, None].expand(-1, 1, 336, 336)
    twice = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(pixels, size=(24, 24), mode="nearest"), size=(16, 16), mode="nearest"
    )[:, 0].bool()
    assert torch.equal(valid_cells(sizes, 336, 16, patch_grid=24), twice)
    assert not torch.equal(valid_cells(sizes, 336, 16), twice)


def test_clip_keeps_the_padding_out_of_attention_given_the_sizes():
    encoder = tiny_clip()
    image = torch.randn(2, 3, 32, 32)
    other = image.clone()
    other[0, :, 16:] = 3.0  # image 0 is 16 pixels tall: other padding content
    sizes = torch.tensor([[16, 32], [32, 32]])
    masked = [encoder(x, sizes) for x in (image, other)]
    for a, b in zip(*masked, strict=True):  # L x (B, C, 4, 4)
        assert torch.allclose(a[0, :, :2], b[0, :, :2], atol=1e-6)  # image rows: same features
        assert torch.equal(a[1], b[1])
    plain = [encoder(x) for x in (image, other)]
    assert (plain[0][0][0, :, :2] - plain[1][0][0, :, :2]).abs().max() > 1e-2  # without: they change
    full = encoder(image, torch.tensor([[32, 32]] * 2))  # no padding: a mask that blocks nothing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full, plain[0], strict=True))


def test_timm_returns_requested_blocks_in_requested_order():
    encoder = tiny_timm(feature_layers=[-2, 0])
    assert (encoder.grid_size, encoder.out_channels, encoder.num_scales) == (8, 32, 2)
    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, **TINY_VIT
    ).eval()
    reference.load_state_dict(encoder.model.state_dict(), strict=False)
    encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    maps = encoder(x)
    block0, block2 = reference.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    torch.testing.assert_close(maps[0], block2, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps[1], block0, rtol=0, atol=1e-6)
    assert len(encoder.model.blocks) == 3  # block 3 pruned


def test_timm_loads_safetensors_and_torch_checkpoints(tmp_path: Path):
    torch.manual_seed(1)
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5, **TINY_VIT
    )
    state = source.state_dict()  # includes a 5-class head, ignored on load
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ["w.safetensors", "w.pt"]:
        encoder = tiny_timm(checkpoint=str(tmp_path / name), feature_layers=[-1])
        assert torch.equal(encoder.model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])
    del state["blocks.0.norm1.weight"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="blocks.0.norm1.weight"):
        tiny_timm(checkpoint=str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError):
        tiny_timm(checkpoint=str(tmp_path / "nope.pt"))


def test_timm_bad_layer_names_index_and_depth():
    with pytest.raises(ValueError, match=r"feature_layers\[1\] = -11 .* 4 feature blocks"):
        tiny_timm(feature_layers=[-2, -11])


def test_timm_frozen_and_trainable():
    frozen = tiny_timm(trainable=False)
    frozen.train()
    assert not frozen.training
    assert all(m.grad_fn is None for m in frozen(torch.randn(1, 3, 64, 64)))
    trainable = tiny_timm()
    sum(m.sum() for m in trainable(torch.randn(1, 3, 64, 64))).backward()
    assert trainable.model.patch_embed.proj.weight.grad.abs().sum() > 0
