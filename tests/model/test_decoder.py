"""Tests of the PixelDecoder contract, Eq. 1's modulation and the cascaded decoder."""

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixellm.model.decoder import (
    CascadedPixelDecoder,
    FourierPositionalEncoding,
    PixelDecoder,
    modulate,
)

DIM = 32


def _decoder(num_scales: int = 2, learn_scale_weights: bool = True) -> CascadedPixelDecoder:
    torch.manual_seed(0)
    return CascadedPixelDecoder(
        num_scales=num_scales,
        dim=DIM,
        num_heads=4,
        mlp_dim=64,
        learn_scale_weights=learn_scale_weights,
    )


def _inputs(
    num_scales: int = 2, batch: int = 2, targets: int = 3, grid: int = 4
) -> tuple[list[Tensor], Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(batch, DIM, grid, grid, generator=generator) for _ in range(num_scales)]
    queries = torch.randn(targets, num_scales, DIM, generator=generator)
    batch_index = torch.arange(targets) % batch
    return features, queries, batch_index


# --- modulate (Eq. 1) ---------------------------------------------------------------------------


def test_modulate_gates_between_one_and_two() -> None:
    f = torch.arange(1.0, 1 + 2 * 3 * 2 * 2).view(2, 3, 2, 2)
    torch.testing.assert_close(modulate(f, torch.zeros(2, 1, 2, 2)), f * 1.5)
    torch.testing.assert_close(modulate(f, torch.full((2, 1, 2, 2), 50.0)), f * 2)
    torch.testing.assert_close(modulate(f, torch.full((2, 1, 2, 2), -50.0)), f)


def test_modulate_resizes_the_mask_to_the_feature_grid() -> None:
    f = torch.ones(1, 2, 4, 4)
    m = torch.tensor([[[[-50.0, 50.0], [-50.0, 50.0]]]])  # left off, right on
    out = modulate(f, m)
    expected_gate = F.interpolate(m, size=(4, 4), mode="bilinear").sigmoid() + 1
    torch.testing.assert_close(out, expected_gate.expand(1, 2, 4, 4))
    torch.testing.assert_close(out[0, :, :, 0], torch.ones(2, 4))  # outer columns copy the mask
    torch.testing.assert_close(out[0, :, :, 3], torch.full((2, 4), 2.0))


# --- scale weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_scale_weights_start_at_one_over_l_in_both_modes(num_scales: int) -> None:
    for learn in (True, False):
        gamma = _decoder(num_scales, learn).scale_weights()
        torch.testing.assert_close(gamma, torch.full((num_scales,), 1 / num_scales))


def test_fixed_scale_weights_are_not_parameters_and_learned_ones_get_gradients() -> None:
    fixed = _decoder(learn_scale_weights=False)
    assert not any("scale" in name for name, _ in fixed.named_parameters())
    assert "fixed_scale_weights" not in fixed.state_dict()  # as the release: never saved

    learned = _decoder()
    with torch.no_grad():
        learned.scale_logits.copy_(torch.tensor([0.3, -1.2]))
    assert learned.scale_weights().sum().item() == pytest.approx(1.0)
    learned(*_inputs()).pow(2).mean().backward()
    assert learned.scale_logits.grad is not None and learned.scale_logits.grad.abs().sum() > 0


def test_learned_and_fixed_modes_agree_at_initialisation() -> None:
    learned, fixed = _decoder(), _decoder(learn_scale_weights=False)
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "scale_logits"})
    inputs = _inputs()
    torch.testing.assert_close(learned(*inputs), fixed(*inputs))


# --- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_forward_shape_is_twice_the_grid_per_scale(num_scales: int) -> None:
    out = _decoder(num_scales)(*_inputs(num_scales, grid=3))
    assert out.shape == (3, 3 * 2**num_scales, 3 * 2**num_scales)
    assert torch.isfinite(out).all()


def test_forward_preserves_dtype() -> None:
    decoder = _decoder().double()
    features, queries, batch_index = _inputs()
    out = decoder([f.double() for f in features], queries.double(), batch_index)
    assert out.dtype == torch.float64


def test_forward_with_no_targets_returns_an_empty_tensor() -> None:
    features, queries, batch_index = _inputs()
    out = _decoder()(features, queries[:0], batch_index[:0])
    assert out.shape == (0, 16, 16)


def test_forward_rejects_a_wrong_number_of_scales() -> None:
    features, queries, batch_index = _inputs()
    with pytest.raises(ValueError, match="2 feature maps"):
        _decoder(num_scales=3)(features, queries, batch_index)


def test_batch_index_routes_each_target_to_its_image() -> None:
    decoder = _decoder()
    features, queries, batch_index = _inputs(batch=2, targets=4)  # targets 0, 2 -> image 0
    out = decoder(features, queries, batch_index)
    perturbed = [f.clone() for f in features]
    for f in perturbed:
        f[0] += torch.randn_like(f[0])
    out_perturbed = decoder(perturbed, queries, batch_index)
    torch.testing.assert_close(out_perturbed[batch_index == 1], out[batch_index == 1])
    assert (out_perturbed[batch_index == 0] - out[batch_index == 0]).abs().amax() > 1e-3


def test_scale_zero_mask_guides_scale_one() -> None:
    # With gamma_0 ~ 0 the output is m^1 alone; it still depends on scale 0's query, through Eq. 1.
    decoder = _decoder()
    with torch.no_grad():
        decoder.scale_logits.copy_(torch.tensor([-30.0, 30.0]))
    features, queries, batch_index = _inputs()
    changed = queries.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])
    assert (
        decoder(features, changed, batch_index) - decoder(features, queries, batch_index)
    ).abs().amax() > 1e-3


def test_every_trainable_parameter_gets_a_gradient() -> None:
    decoder = _decoder()
    decoder(*_inputs()).pow(2).mean().backward()
    missing = [
        n
        for n, p in decoder.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []
    # Only the hypernetworks of mask tokens 1.. are unused; they are frozen, not trained.
    frozen = {n.split(".")[1] for n, p in decoder.named_parameters() if not p.requires_grad}
    assert frozen == {"1", "2", "3"}
    assert all(
        n.startswith("output_hypernetworks_mlps.")
        for n, p in decoder.named_parameters()
        if not p.requires_grad
    )


def test_decoder_overfits_one_example() -> None:
    decoder = _decoder()
    features, queries, batch_index = _inputs(targets=2, grid=2)
    target = torch.zeros(2, 8, 8)
    target[0, :, :4] = 1  # left half
    target[1, 2:6, 2:6] = 1  # a centred square
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(50):
        loss = F.binary_cross_entropy_with_logits(decoder(features, queries, batch_index), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0]


def test_fourier_encoding_values() -> None:
    pe = FourierPositionalEncoding(dim=2)
    pe.gaussian.copy_(torch.tensor([[0.25], [0.0]]))  # depends on x only
    out = pe(height=1, width=2)  # x centres 0.25, 0.75 -> -0.5, 0.5 in [-1, 1]
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(out, torch.tensor([[[-s, s]], [[s, s]]]))


# --- postprocess --------------------------------------------------------------------------------


def test_postprocess_crops_padding_resizes_and_groups_by_image() -> None:
    pad = -100.0
    logits = torch.full((4, 4, 4), pad)
    logits[0] = 7.0  # image 1
    logits[1, :2, :] = 5.0  # image 0: valid region 2 x 4, rest padding
    logits[2] = torch.arange(16.0).view(4, 4)  # image 1
    logits[3, :2, :2], logits[3, :2, 2:] = 1.0, 3.0  # image 0: left / right halves
    batch_index = torch.tensor([1, 0, 1, 0])
    resized = torch.tensor([[2, 4], [4, 4], [4, 4]])
    original = torch.tensor([[4, 8], [4, 4], [2, 2]])
    masks = _decoder().postprocess(logits, batch_index, 4, resized, original)

    assert [tuple(m.shape) for m in masks] == [(2, 4, 8), (2, 4, 4), (0, 2, 2)]
    torch.testing.assert_close(masks[0][0], torch.full((4, 8), 5.0))  # padding cropped away
    row = torch.tensor([1.0, 1.0, 1.0, 1.5, 2.5, 3.0, 3.0, 3.0])  # bilinear, align_corners=False
    torch.testing.assert_close(masks[0][1], row.expand(4, 8))
    torch.testing.assert_close(masks[1][0], torch.full((4, 4), 7.0))  # text order kept
    torch.testing.assert_close(masks[1][1], torch.arange(16.0).view(4, 4))


def test_postprocess_resizes_low_resolution_logits_to_the_input_first() -> None:
    logits = torch.tensor([[[4.0, 4.0], [0.0, 0.0]]])  # 2 x 2 over a 4 x 4 input: rows 4, 3, 1, 0
    masks = _decoder().postprocess(
        logits, torch.tensor([0]), 4, torch.tensor([[2, 4]]), torch.tensor([[4, 8]])
    )
    rows = torch.tensor([4.0, 3.75, 3.25, 3.0])  # crop rows (4, 3), resized to 4 rows
    torch.testing.assert_close(masks[0][0], rows[:, None].expand(4, 8))


# --- the abstract contract ----------------------------------------------------------------------


class DotProductDecoder(PixelDecoder):
    """The README's example: scale 0's query dotted with scale 0's features, upsampled 4x."""

    def __init__(self, *, dim: int) -> None:
        super().__init__(num_scales=1, dim=dim)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, features: Sequence[Tensor], queries: Tensor, batch_index: Tensor) -> Tensor:
        image = features[0][batch_index]  # (T, D, h, w)
        logits = torch.einsum("td,tdhw->thw", queries[:, 0], image) * self.temperature
        return F.interpolate(logits[:, None], scale_factor=4, mode="bilinear")[:, 0]


def test_a_ten_line_subclass_satisfies_the_contract() -> None:
    decoder = DotProductDecoder(dim=DIM)
    features, queries, batch_index = _inputs(num_scales=1, grid=2)
    logits = decoder(features, queries, batch_index)
    assert logits.shape == (3, 8, 8)
    pixel = (queries[1, 0] * features[0][batch_index[1], :, 0, 0]).sum()
    torch.testing.assert_close(logits[1, 0, 0], pixel)  # corner pixels copy the grid corner
    masks = decoder.postprocess(
        logits, batch_index, 8, torch.tensor([[8, 8], [8, 4]]), torch.tensor([[8, 8], [4, 2]])
    )
    assert [tuple(m.shape) for m in masks] == [(2, 8, 8), (1, 4, 2)]


def test_a_subclass_without_forward_cannot_be_instantiated() -> None:
    class Incomplete(PixelDecoder):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(num_scales=1, dim=DIM)


def test_postprocess_of_a_batch_equals_each_image_alone_with_gradients() -> None:
    # three images of one size (one call) and one of another, targets interleaved across images
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 4, requires_grad=True)
    batch_index = torch.tensor([2, 0, 0, 3, 2, 1])
    resized = torch.tensor([[3, 4], [3, 4], [3, 4], [4, 2]])
    original = torch.tensor([[6, 8], [6, 8], [6, 8], [5, 3]])
    decoder = _decoder()
    masks = decoder.postprocess(logits, batch_index, 8, resized, original)
    weights = [torch.randn_like(m) for m in masks]
    grad = torch.autograd.grad(sum((m * w).sum() for m, w in zip(masks, weights, strict=True)), logits)[0]
    expected_grad = torch.zeros_like(logits)
    for b in range(4):
        mine = (batch_index == b).nonzero().flatten()
        alone = decoder.postprocess(logits[mine], torch.zeros_like(mine), 8, resized[b : b + 1], original[b : b + 1])
        torch.testing.assert_close(masks[b], alone[0])
        expected_grad += torch.autograd.grad((alone[0] * weights[b]).sum(), logits)[0]
    torch.testing.assert_close(grad, expected_grad)
