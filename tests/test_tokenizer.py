"""Tests of pixellm.tokenizer: codebook token strings and the tokenizers' added ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pixellm.data.shapes import shapes_corpus
from pixellm.tokenizer import IMAGE_TOKEN, codebook_token_strings, load_tokenizer

CODEBOOK = codebook_token_strings(2, 3)


def test_codebook_strings_are_scale_major() -> None:
    assert CODEBOOK == ["[SEG0]", "[SEG1]", "[SEG2]", "[SEG3]", "[SEG4]", "[SEG5]"]
    assert codebook_token_strings(1, 2, "<cb{}>") == ["<cb0>", "<cb1>"]
    with pytest.raises(ValueError, match="must be >= 1"):
        codebook_token_strings(0, 3)


def test_added_ids_are_distinct_and_known() -> None:
    tok = load_tokenizer("shapes", CODEBOOK)
    ids = tok.convert_tokens_to_ids([IMAGE_TOKEN, *CODEBOOK])
    assert len(set(ids)) == 7
    assert tok.unk_token_id not in ids
    assert tok.pad_token_id is not None and tok.pad_token_id not in ids
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == {"<s>", "</s>", "<pad>"}


def test_every_corpus_word_is_in_the_vocabulary() -> None:
    tok = load_tokenizer("shapes", CODEBOOK)
    words = sorted(set(shapes_corpus()))
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words)
    assert tok.unk_token_id not in ids


def test_codebook_tokens_survive_encode_decode() -> None:
    tok = load_tokenizer("shapes", CODEBOOK)
    text = (
        "the small red circle "
        + " ".join(CODEBOOK)
        + " and the large blue square "
        + " ".join(CODEBOOK)
        + " ."
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    codebook_ids = tok.convert_tokens_to_ids(CODEBOOK)
    assert [i for i in ids if i in codebook_ids] == codebook_ids * 2  # one id per token, in order
    assert tok.decode(ids, skip_special_tokens=False) == text


def _vocab_in_subprocess() -> dict[str, int]:
    code = (
        "import json; from pixellm.tokenizer import load_tokenizer, codebook_token_strings; "
        "print(json.dumps(load_tokenizer('shapes', codebook_token_strings(2, 3)).get_vocab()))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ids_are_deterministic_across_calls_and_processes() -> None:
    first = load_tokenizer("shapes", CODEBOOK).get_vocab()
    assert load_tokenizer("shapes", CODEBOOK).get_vocab() == first
    assert _vocab_in_subprocess() == first


def test_local_directory_round_trip(tmp_path: Path) -> None:
    saved = load_tokenizer("shapes", CODEBOOK)
    saved.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), CODEBOOK)
    assert loaded.convert_tokens_to_ids(CODEBOOK) == saved.convert_tokens_to_ids(CODEBOOK)
    assert (
        loaded("the red circle [SEG3]")["input_ids"] == saved("the red circle [SEG3]")["input_ids"]
    )


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(str(missing), CODEBOOK)


def test_colliding_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        load_tokenizer("shapes", ["[SEG0]", "[SEG0]"])
    with pytest.raises(ValueError, match="distinct"):
        load_tokenizer("shapes", [IMAGE_TOKEN])
