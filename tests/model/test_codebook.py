"""Segmentation codebook: gathering the emitting states in text order, and token fusion."""

import pytest
import torch

from pixellm.model.codebook import SegmentationCodebook

CODE = [90, 91, 92, 93]  # L=2, N=2


def make(fusion: str = "linear", hidden: int = 4, dim: int = 3) -> SegmentationCodebook:
    book = SegmentationCodebook(hidden_size=hidden, decoder_dim=dim, num_scales=2, tokens_per_scale=2, fusion=fusion)
    book.bind(CODE)
    return book


def test_token_strings_are_scale_major_and_distinct_ids_required():
    book = SegmentationCodebook(hidden_size=4, decoder_dim=3)
    assert book.tokens == ["[SEG0]", "[SEG1]", "[SEG2]", "[SEG3]", "[SEG4]", "[SEG5]"]
    with pytest.raises(ValueError, match="distinct"):
        book.bind([5, 5, 6, 7, 8, 9])


def test_gather_takes_the_state_before_each_codebook_token_in_text_order():
    ids = torch.tensor(
        [
            [1, 2, 90, 91, 92, 93, 5, 90, 91, 92, 93, 0],  # two targets
            [1, 3, 4, 90, 91, 92, 93, 0, 0, 0, 0, 0],  # one target
        ]
    )
    hidden = torch.arange(2 * 12, dtype=torch.float)[:, None].repeat(1, 4).reshape(2, 12, 4)  # value = 12*b + pos
    targets = make().gather(hidden[:, :-1], ids[:, 1:])
    assert targets.states.shape == (3, 2, 2, 4)
    # emitting positions: row 0 -> 1,2,3,4 and 6,7,8,9 ; row 1 -> 2,3,4,5 (+12)
    got = targets.states[..., 0].reshape(3, 4).tolist()
    assert got == [[1, 2, 3, 4], [6, 7, 8, 9], [14, 15, 16, 17]]
    assert targets.batch_index.tolist() == [0, 0, 1]
    assert targets.dropped_tokens.tolist() == [0, 0]


def test_incomplete_group_raises_when_strict_and_is_dropped_otherwise():
    ids = torch.tensor([[1, 90, 91, 92, 93, 90, 91, 2]])
    hidden = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        make().gather(hidden, ids)
    targets = make().gather(hidden, ids, strict=False)
    assert targets.states.shape == (1, 2, 2, 4)
    assert torch.equal(targets.states[0].reshape(4, 4), hidden[0, 1:5])
    assert targets.dropped_tokens.tolist() == [2]


def test_no_codebook_tokens_gives_zero_targets():
    targets = make().gather(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long))
    assert targets.states.shape == (0, 2, 2, 4) and targets.batch_index.numel() == 0


def test_fusion_modes():
    states = torch.randn(3, 2, 2, 4)
    mean, release, linear = make("mean"), make("release"), make("linear")
    release.load_state_dict(mean.state_dict())
    linear.project.load_state_dict(mean.project.state_dict())
    projected = mean.project(states)  # (T, L, N, D)
    assert torch.allclose(mean(states), projected.mean(2))
    # the release sums a group's N states times 1/(L*N): half the mean for L=2, N=2
    assert torch.allclose(release(states), projected.sum(2) / 4)
    assert torch.allclose(release(states), mean(states) / 2)
    # the learned projection starts as the mean and is a parameter
    assert torch.allclose(linear(states), mean(states), atol=1e-6)
    assert linear.fuse.requires_grad and "fuse" not in dict(mean.named_parameters())
    assert linear(states).shape == (3, 2, 3)
