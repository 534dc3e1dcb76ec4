"""Bad or hostile text: long prompts, empty questions, invalid characters, typed codebook tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from muse_files import record, write_dataset
from transformers import PreTrainedTokenizerBase

from pixellm.data.collate import MuseCollator
from pixellm.data.errors import DataError
from pixellm.data.muse import MuseDataset
from pixellm.data.preprocess import TextEncoder, neutralize_tokens
from pixellm.reliability.skipping import SkipFilteringCollate
from pixellm.tokenizer import IMAGE_TOKEN, codebook_token_strings, load_tokenizer

CODEBOOK = codebook_token_strings(2, 3)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("shapes", CODEBOOK)


@pytest.fixture(scope="module")
def encoder(tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    return TextEncoder(tokenizer, CODEBOOK, "plain")


def _codebook_ids(encoder: TextEncoder, ids: list[int]) -> int:
    return sum(i in encoder.codebook_ids for i in ids)


def test_prompt_longer_than_model_max_length_never_cuts_a_codebook_group(
    tokenizer: PreTrainedTokenizerBase, encoder: TextEncoder
) -> None:
    question = "is the red circle left of " * 40 + "the square?"  # ~ 250 tokens
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = 16  # the tokenizer's own limit never truncates
    try:
        encoded = encoder.encode(question, "it {seg} and it {seg}.", 2)
    finally:
        tokenizer.model_max_length = limit
    assert len(encoded.input_ids) > 200 and encoded.dropped_targets == 0
    assert _codebook_ids(encoder, encoded.labels) == 2 * 6  # every codebook token is kept
    whole = len(encoded.input_ids)
    short = TextEncoder(tokenizer, CODEBOOK, "plain", max_length=whole - 4)  # cut in group 2
    cut = short.encode(question, "it {seg} and it {seg}.", 2)
    assert (cut.num_targets, cut.dropped_targets) == (1, 1)
    assert _codebook_ids(encoder, cut.input_ids) == 6  # one whole group, none of the second


def test_empty_question_is_a_data_error_and_its_sample_is_skipped(
    encoder: TextEncoder, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"^x\.json record 3: the question is empty$"):
        encoder.encode("  \n", "it {seg}.", 1, where="x.json record 3")
    collate = SkipFilteringCollate(MuseCollator(encoder.tokenizer, CODEBOOK, "plain", 32))
    dataset = MuseDataset(
        write_dataset(tmp_path, [record(), record(questions=[""]), record()]), tmp_path / "images"
    )
    with pytest.warns(UserWarning, match=r"skipping bad sample\(s\), first: .*: the question is empty"):
        batch = collate([dataset[0], dataset[1], dataset[2]])
    assert [m["record_index"] for m in batch["meta"]] == [0, 2] and len(batch["masks"]) == 2
    assert len(batch["skipped"]) == 1 and batch["skipped"][0].index is None
    asked = dataclasses.replace(dataset[0], question=" ", meta={"file_name": "cat.jpg"})  # as the predictor asks
    with pytest.raises(DataError, match=r"^cat\.jpg: the question is empty$"):
        MuseCollator(encoder.tokenizer, CODEBOOK, "plain", 32).check(asked)
    with pytest.raises(DataError, match=r"^muse .*\.json record 1 question 0: the question is empty$"):
        MuseCollator(encoder.tokenizer, CODEBOOK, "plain", 32).check(dataset[1])


def test_invalid_unicode_in_a_question(encoder: TextEncoder, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([record(questions=["where \ud800 is it?"])]))  # a lone surrogate
    dataset = MuseDataset(path, tmp_path)
    question, answer, k = dataset.text(0)
    with pytest.raises(DataError, match=r"m\.json rec 0: text holds an invalid character \(surrogates"):
        encoder.encode(question, answer, k, where="m.json rec 0")


def test_typed_codebook_tokens_stay_text(encoder: TextEncoder) -> None:
    typed = "what does [SEG0][SEG1] [SEG5] mean?"
    encoded = encoder.encode(typed, "it {seg}.", 1)
    prompt = encoded.prompt_ids
    assert _codebook_ids(encoder, prompt) == 0  # the question adds no target
    assert _codebook_ids(encoder, encoded.input_ids) == 6  # only the answer's one group
    assert neutralize_tokens(typed, CODEBOOK) == "what does [ SEG0][ SEG1] [ SEG5] mean?"
    assert neutralize_tokens("[SEG[SEG0]0]", CODEBOOK) == "[SEG[ SEG0]0]"


def test_typed_image_token_is_refused(encoder: TextEncoder) -> None:
    with pytest.raises(DataError, match=rf"q7: question must not contain '{IMAGE_TOKEN}'"):
        encoder.encode(f"look {IMAGE_TOKEN}", "none.", 0, where="q7")


def test_codebook_tokens_in_an_answer_text_are_refused(encoder: TextEncoder) -> None:
    with pytest.raises(DataError, match=r"has 12 codebook tokens in the conversation, expected 1 targets x 6"):
        encoder.encode("where?", "it {seg} or [SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]", 1)
