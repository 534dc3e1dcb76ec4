"""Tests of the image transform, the conversation templates and the text encoder."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pixellm.data.conversation import build_prompt
from pixellm.data.preprocess import (
    DEFAULT_PIXEL_MEAN,
    DEFAULT_PIXEL_STD,
    IGNORE_INDEX,
    ImageTransform,
    TextEncoder,
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


def test_a_very_thin_image_keeps_one_pixel_row() -> None:
    """1000 x 1 at 448: SAM's rounding gives a height of 0 (an error in PIL); it stays 1 row."""
    pixels, hw = ImageTransform(448, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(Image.new("RGB", (1000, 1), (9, 9, 9)))
    assert hw == (1, 448) == resized_shape(1, 1000, 448) and resized_shape(1000, 1, 448) == (448, 1)
    assert torch.all(pixels[:, 0] == 9) and torch.count_nonzero(pixels[:, 1:]) == 0


@pytest.mark.parametrize("template", ["plain", "llava_v1"])
def test_labels_mask_exactly_bos_and_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str
) -> None:
    encoder = TextEncoder(tokenizer, CODEBOOK, template)
    encoded = encoder.encode(
        "segment every circle.", "the small red circle {seg} and the large blue circle {seg}.", 2
    )
    ids, labels, n = encoded.input_ids, encoded.labels, len(encoded.prompt_ids)
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
        ValueError, match="x.json record 3: .* has 6 codebook tokens .* expected 2 targets x 6"
    ):
        encoder.encode("q", "a {seg}.", 2, where="x.json record 3")
    with pytest.raises(ValueError, match="must not contain"):
        encoder.encode(f"look {IMAGE_TOKEN}", "none.", 0)


def _word_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of space-separated words and tokens, one id each (hand-built, no tokenizer call)."""
    return tokenizer.convert_tokens_to_ids(text.split())


def test_truncation_cuts_before_a_codebook_group_and_drops_its_target(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    seg = " ".join(CODEBOOK)
    prompt = _word_ids(tokenizer, f"<s> USER : {IMAGE_TOKEN} segment every circle . ASSISTANT :")
    answer = _word_ids(tokenizer, f"the red circle {seg} and the blue circle {seg} . </s>")
    second_group = len(prompt) + 3 + 6 + 4  # "the red circle" + group 1 + "and the blue circle"
    question, text = "segment every circle.", "the red circle {seg} and the blue circle {seg}."
    full = TextEncoder(tokenizer, CODEBOOK, "plain").encode(question, text, 2)
    assert full.input_ids == prompt + answer and full.num_targets == 2 and full.cut_tokens == 0
    for limit in (second_group + 1, second_group + 5):  # inside the second group: cut before it
        cut = TextEncoder(tokenizer, CODEBOOK, "plain", max_length=limit).encode(question, text, 2)
        assert cut.input_ids == (prompt + answer)[:second_group]
        assert cut.labels == [IGNORE_INDEX] * len(prompt) + answer[: second_group - len(prompt)]
        assert (cut.num_targets, cut.dropped_targets) == (1, 1)
        assert cut.prompt_ids == prompt  # the generation prompt is never cut
    kept = TextEncoder(tokenizer, CODEBOOK, "plain", max_length=second_group + 6).encode(question, text, 2)
    assert (kept.num_targets, kept.cut_tokens) == (2, 2)  # only " . </s>" cut: both groups whole
    # 4 image positions: 3 fewer text ids fit, and the image token itself is never cut
    image = TextEncoder(tokenizer, CODEBOOK, "plain", max_length=second_group + 6, image_length=4)
    assert image.encode(question, text, 2).input_ids == (prompt + answer)[:second_group]
    tiny = TextEncoder(tokenizer, CODEBOOK, "plain", max_length=5, image_length=4).encode(question, text, 2)
    assert tiny.input_ids == prompt[:4] and tiny.num_targets == 0


def test_history_turns_are_labelled_and_the_image_is_in_the_first(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    encoder = TextEncoder(tokenizer, CODEBOOK, "plain")
    history = [("segment the red circle.", "there is no red circle."), ("which shapes are blue?", "the blue square.")]
    encoded = encoder.encode("segment it.", "the blue square {seg}.", 1, history=history)
    eos = tokenizer.eos_token_id
    turns = [
        (f"<s> USER : {IMAGE_TOKEN} segment the red circle . ASSISTANT :", "there is no red circle . </s>"),
        ("USER : which shapes are blue ? ASSISTANT :", "the blue square . </s>"),
        ("USER : segment it . ASSISTANT :", f"the blue square {' '.join(CODEBOOK)} . </s>"),
    ]
    ids, labels = [], []
    for prompt, answer in turns:
        ids += _word_ids(tokenizer, prompt) + _word_ids(tokenizer, answer)
        labels += [IGNORE_INDEX] * len(_word_ids(tokenizer, prompt)) + _word_ids(tokenizer, answer)
    assert encoded.input_ids == ids and encoded.labels == labels
    assert encoded.input_ids.count(eos) == 3 and encoded.prompt_ids == ids[: len(ids) - 11]  # "the blue square" + 6 + ". </s>"
    with pytest.raises(ValueError, match="expected 1 targets x 6 in the answer"):
        encoder.encode("q", "the blue square {seg}.", 1, history=[("q", "[SEG0] [SEG1]")])


def test_llama_2_opens_every_turn_with_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = TextEncoder(tokenizer, CODEBOOK, "llama_2").encode("q", "a.", 0, history=[("q", "a.")])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = encoded.input_ids
    assert ids.count(bos) == 2 and ids[0] == bos and ids[ids.index(eos) + 1] == bos
    assert [encoded.labels[i] for i, t in enumerate(ids) if t in (bos, eos)] == [IGNORE_INDEX, eos, IGNORE_INDEX, eos]


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    """The release's <im_start>/<im_end> would otherwise become several ordinary tokens."""
    with pytest.raises(ValueError, match=r"'llava_v1_im_start_end' needs the tokens \['<im_start>', '<im_end>'\]"):
        TextEncoder(tokenizer, CODEBOOK, "llava_v1_im_start_end")
