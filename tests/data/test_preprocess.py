"""Tests of the image transform, the conversation templates and the text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pixellm.data.conversation import build_prompt, fill_answer
from pixellm.data.muse import MuseDataset
from pixellm.data.preprocess import (
    DEFAULT_PIXEL_MEAN,
    DEFAULT_PIXEL_STD,
    IGNORE_INDEX,
    ImageTransform,
    TextEncoder,
    drop_long_samples,
    resized_shape,
)
from pixellm.tokenizer import IMAGE_TOKEN, codebook_token_strings, load_tokenizer

CODEBOOK = codebook_token_strings(2, 3)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("shapes", CODEBOOK)


def test_resize_and_pad_of_a_wide_image() -> None:
    image = Image.new("RGB", (60, 30), (200, 100, 50))  # W=60, H=30
    pixels, (h, w) = ImageTransform(64)(image)
    assert (h, w) == (32, 64) == resized_shape(30, 60, 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    expected = (
        torch.tensor([200.0, 100.0, 50.0]) - torch.tensor(DEFAULT_PIXEL_MEAN)
    ) / torch.tensor(DEFAULT_PIXEL_STD)
    assert torch.allclose(pixels[:, :32, :], expected.view(3, 1, 1).expand(3, 32, 64), atol=1e-5)
    assert torch.count_nonzero(pixels[:, 32:, :]) == 0  # padding rows are exactly zero


def test_custom_normalisation_and_tall_image() -> None:
    image = Image.new("RGB", (10, 40), (10, 20, 30))
    pixels, hw = ImageTransform(64, (10.0, 20.0, 30.0), (1.0, 1.0, 1.0))(image)
    assert hw == (64, 16)
    assert torch.count_nonzero(pixels) == 0  # mean subtracted exactly, padding zero


def test_templates() -> None:
    assert build_prompt("plain", "q?") == f"USER: {IMAGE_TOKEN}\nq? ASSISTANT:"
    assert build_prompt("llava_v1", "q?").startswith("A chat between a curious human")
    assert build_prompt("llava_v1", "q?").endswith(f"questions. USER: {IMAGE_TOKEN}\nq? ASSISTANT:")
    assert fill_answer("a {seg} and b {seg}.", ["[A]", "[B]"]) == "a [A] [B] and b [A] [B]."
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_prompt("vicuna", "q")


@pytest.mark.parametrize("template", ["plain", "llava_v1"])
def test_labels_mask_exactly_bos_and_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str
) -> None:
    encoder = TextEncoder(tokenizer, CODEBOOK, template)
    encoded = encoder.encode(
        "segment every circle.", "the small red circle {seg} and the large blue circle {seg}.", 2
    )
    ids, labels, n = encoded.input_ids, encoded.labels, encoded.prompt_length
    prompt = tokenizer(build_prompt(template, "segment every circle."), add_special_tokens=False)[
        "input_ids"
    ]
    assert ids[:n] == [tokenizer.bos_token_id, *prompt]
    assert tokenizer.decode(ids[n - 2 : n]) == "ASSISTANT :"
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    codebook_ids = tokenizer.convert_tokens_to_ids(CODEBOOK)
    assert [i for i in labels if i in codebook_ids] == codebook_ids * 2
    assert tokenizer.unk_token_id not in ids
    assert encoded.answer.startswith(
        "the small red circle [SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5] and"
    )


def test_codebook_count_mismatch_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    encoder = TextEncoder(tokenizer, CODEBOOK, "plain")
    with pytest.raises(
        ValueError, match="x.json record 3: .* has 6 codebook tokens, expected 2 targets x 6"
    ):
        encoder.encode("q", "a {seg}.", 2, where="x.json record 3")
    with pytest.raises(ValueError, match="must not contain"):
        encoder.encode(f"look {IMAGE_TOKEN}", "none.", 0)


def test_long_samples_are_skipped_with_one_warning(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    ann = {"segmentation": {"size": [2, 2], "counts": [0, 4]}, "rephrased_name": "the red circle"}
    record = {
        "file_name": "a.png",
        "height": 2,
        "width": 2,
        "ann_list": [ann],
        "questions": ["segment the red circle.", "segment every circle and every square."],
        "answers": [[ann], [ann, ann, ann]],
        "text_answers": [
            "the red circle {seg}.",
            "the red circle {seg}, the red circle {seg} and the red circle {seg}.",
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps([record]))
    dataset = MuseDataset(tmp_path / "m.json", tmp_path)
    encoder = TextEncoder(tokenizer, CODEBOOK, "plain")
    short = len(encoder.encode(*dataset.text(0)).input_ids)
    with pytest.warns(UserWarning, match="skipped 1 of 2 samples"):
        kept = drop_long_samples(dataset, encoder, max_length=short)
    assert list(kept.indices) == [0]
