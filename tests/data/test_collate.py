"""Tests of batch collation: padding sides and values, labels, masks, sizes, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pixellm.data.collate import MuseCollator
from pixellm.data.preprocess import IGNORE_INDEX
from pixellm.data.sample import Sample
from pixellm.tokenizer import codebook_token_strings, load_tokenizer

CODEBOOK = codebook_token_strings(2, 3)


def _samples() -> list[Sample]:
    one = torch.zeros(1, 30, 60, dtype=torch.uint8)
    one[0, :10, :10] = 1
    return [
        Sample(
            Image.new("RGB", (60, 30), (255, 0, 0)),
            "segment the red square.",
            "the small red square {seg}.",
            one,
            {"record_index": 0},
        ),
        Sample(
            Image.new("RGB", (64, 64)),
            "which shapes have four corners?",
            "the small red square {seg} and the large blue diamond {seg}.",
            torch.ones(2, 64, 64, dtype=torch.uint8),
            {"record_index": 1},
        ),
        Sample(
            Image.new("RGB", (64, 64)),
            "segment the green circle.",
            "there is no green circle.",
            torch.zeros(0, 64, 64, dtype=torch.uint8),
            {"record_index": 2},
        ),
    ]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("shapes", CODEBOOK)


def test_train_batch_is_right_padded(tokenizer: PreTrainedTokenizerBase) -> None:
    batch = MuseCollator(tokenizer, CODEBOOK, "plain", 64)(_samples())
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == att.dtype == labels.dtype == torch.long
    assert ids.shape == att.shape == labels.shape and ids.shape[0] == 3
    lengths = att.sum(1)
    assert lengths[1] == ids.shape[1] and lengths[0] < lengths[1] and lengths[2] < lengths[0]
    for row, n in enumerate(lengths.tolist()):
        assert (att[row, :n] == 1).all() and (att[row, n:] == 0).all()
        assert (ids[row, n:] == tokenizer.pad_token_id).all() and (
            labels[row, n:] == IGNORE_INDEX
        ).all()
        assert ids[row, 0] == tokenizer.bos_token_id and ids[row, n - 1] == tokenizer.eos_token_id
    codebook = torch.tensor(tokenizer.convert_tokens_to_ids(CODEBOOK))
    assert torch.isin(labels, codebook).sum(1).tolist() == [6, 12, 0]
    assert (
        batch["pixel_values"].shape == (3, 3, 64, 64)
        and batch["pixel_values"].dtype == torch.float32
    )
    assert batch["resized_sizes"].tolist() == [[32, 64], [64, 64], [64, 64]]
    assert batch["original_sizes"].tolist() == [[30, 60], [64, 64], [64, 64]]
    assert batch["padded"] is True  # the first image's bottom half
    assert MuseCollator(tokenizer, CODEBOOK, "plain", 64)(_samples()[1:])["padded"] is False
    assert [m.shape for m in batch["masks"]] == [(1, 30, 60), (2, 64, 64), (0, 64, 64)]
    assert batch["masks"][0].dtype == torch.float32 and batch["masks"][0].sum() == 100
    assert batch["answers"][0] == "the small red square [SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]."
    assert batch["questions"][2] == "segment the green circle." and batch["meta"][1] == {
        "record_index": 1
    }


def test_generate_batch_is_left_padded_prompt_only(tokenizer: PreTrainedTokenizerBase) -> None:
    train = MuseCollator(tokenizer, CODEBOOK, "plain", 64)(_samples())
    batch = MuseCollator(tokenizer, CODEBOOK, "plain", 64, mode="generate")(_samples())
    assert "labels" not in batch
    ids, att = batch["input_ids"], batch["attention_mask"]
    colon = tokenizer.convert_tokens_to_ids(":")
    assert (ids[:, -1] == colon).all()  # every prompt ends after "ASSISTANT:"
    for row, n in enumerate(att.sum(1).tolist()):
        width = ids.shape[1]
        assert (att[row, width - n :] == 1).all() and (att[row, : width - n] == 0).all()
        assert (ids[row, : width - n] == tokenizer.pad_token_id).all()
        prompt_length = int(
            (train["labels"][row] == IGNORE_INDEX)
            .logical_and(train["attention_mask"][row] == 1)
            .sum()
        )
        assert ids[row, width - n :].tolist() == train["input_ids"][row, :prompt_length].tolist()


def test_collator_pickles(tokenizer: PreTrainedTokenizerBase) -> None:
    collator = MuseCollator(tokenizer, CODEBOOK, "llava_v1", 64)
    clone = pickle.loads(pickle.dumps(collator))
    assert torch.equal(clone(_samples())["input_ids"], collator(_samples())["input_ids"])


def test_bad_mode_is_rejected(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="collate mode"):
        MuseCollator(tokenizer, CODEBOOK, "plain", 64, mode="eval")  # type: ignore[arg-type]


def _one_image_two_questions_and_a_chat() -> list[Sample]:
    """Two questions about one image (1 and 3 targets, distinct masks) and a K=0 chat item."""
    image = Image.new("RGB", (8, 6), (0, 0, 255))
    masks = torch.zeros(3, 6, 8, dtype=torch.uint8)
    for k in range(3):
        masks[k, k, : k + 1] = 1  # mask k has k + 1 pixels in row k
    return [
        Sample(image, "segment the blue square.", "the blue square {seg}.", masks[1:2], {"question_index": 0}),
        Sample(
            image,
            "segment every square.",
            "the small square {seg}, the blue square {seg} and the large square {seg}.",
            masks,
            {"question_index": 1},
        ),
        Sample(
            image,
            "which shapes are blue?",
            "the blue square.",
            torch.zeros(0, 6, 8, dtype=torch.uint8),
            {"question_index": 2},
            history=[("segment the red circle.", "there is no red circle.")],
        ),
    ]


def test_masks_stay_aligned_with_codebook_groups(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = _one_image_two_questions_and_a_chat()
    batch = MuseCollator(tokenizer, CODEBOOK, "plain", 16)(samples)
    codebook = torch.tensor(tokenizer.convert_tokens_to_ids(CODEBOOK))
    assert torch.isin(batch["labels"], codebook).sum(1).tolist() == [6, 18, 0]
    assert [m.sum(dim=(1, 2)).tolist() for m in batch["masks"]] == [[2.0], [1.0, 2.0, 3.0], []]
    assert torch.equal(batch["masks"][1], samples[1].masks.float())
    eos = tokenizer.eos_token_id
    assert (batch["labels"][2] == eos).sum() == 2  # the history's answer is a target too


def test_a_refused_sample_leaves_the_truncation_counts_of_the_others_right(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The skipping wrapper re-collates a batch without the refused sample: each used sample still
    counts once (not once per attempt)."""
    from pixellm.reliability.skipping import SkipFilteringCollate

    image = Image.new("RGB", (8, 8))
    good = Sample(image, "segment every circle.", "the circle {seg} and the square {seg}.", torch.ones(2, 8, 8))
    bad = Sample(image, "segment every circle.", "the circle {seg}.", torch.ones(2, 8, 8))  # 1 {seg}, 2 masks
    collator = MuseCollator(tokenizer, CODEBOOK, "plain", 16, max_length=12)
    with pytest.warns(UserWarning):
        batch = SkipFilteringCollate(collator)([good, bad, good])
    assert len(batch["meta"]) == 2 and len(batch["skipped"]) == 1
    clean = MuseCollator(tokenizer, CODEBOOK, "plain", 16, max_length=12)
    with pytest.warns(UserWarning):
        clean([good, good])
    assert collator.truncation == clean.truncation and collator.truncation.samples == 2
    assert collator.truncation.truncated_samples == 2 and collator.truncation.dropped_targets > 0


def test_truncation_drops_masks_of_cut_targets_and_counts_them(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = _one_image_two_questions_and_a_chat()
    full = MuseCollator(tokenizer, CODEBOOK, "plain", 16)(samples)
    second = full["input_ids"][1].tolist()
    first_group_end = second.index(tokenizer.convert_tokens_to_ids(CODEBOOK[-1])) + 1
    collator = MuseCollator(tokenizer, CODEBOOK, "plain", 16, max_length=first_group_end + 3)
    with pytest.warns(UserWarning, match=r"truncation so far: 2 of 3 samples cut, 2 targets dropped"):
        batch = collator(samples)
    assert batch["input_ids"].shape[1] <= first_group_end + 3
    assert [m.shape[0] for m in batch["masks"]] == [1, 1, 0]
    assert torch.equal(batch["masks"][1], samples[1].masks[:1].float())  # the first target kept
    codebook = torch.tensor(tokenizer.convert_tokens_to_ids(CODEBOOK))
    assert torch.isin(batch["labels"], codebook).sum(1).tolist() == [6, 6, 0]
    generate = MuseCollator(tokenizer, CODEBOOK, "plain", 16, mode="generate", max_length=first_group_end + 3)
    assert [m.shape[0] for m in generate(samples)["masks"]] == [1, 3, 0]  # evaluation keeps all
