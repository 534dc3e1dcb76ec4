"""Tokenizers: the offline word-level "shapes" tokenizer and local Hugging Face tokenizers.

Both get the image token and the segmentation-codebook tokens added as special tokens, so that
each of them is one id (resolved with ``convert_tokens_to_ids``, never by tokenising the string).
"""

from __future__ import annotations

import functools
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import WordLevelTrainer

IMAGE_TOKEN = "<image>"
SHAPES_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def codebook_token_strings(
    num_scales: int, tokens_per_scale: int, template: str = "[SEG{}]"
) -> list[str]:
    """Return the L·N codebook token strings, scale-major.

    For ``num_scales=2, tokens_per_scale=3``: ``["[SEG0]", ..., "[SEG5]"]``; ``[SEG0..2]``
    belong to scale 0 and ``[SEG3..5]`` to scale 1.

    Args:
        num_scales: L, the number of visual scales (>= 1).
        tokens_per_scale: N, the number of tokens per scale group (>= 1).
        template: Format string with one ``{}`` for the running index.

    Raises:
        ValueError: If a count is below 1 or the template has no ``{}``.
    """
    if num_scales < 1 or tokens_per_scale < 1:
        raise ValueError(
            f"num_scales and tokens_per_scale must be >= 1, got {num_scales} and {tokens_per_scale}"
        )
    if "{}" not in template:
        raise ValueError(f"codebook token template {template!r} needs a '{{}}' for the index")
    return [template.format(i) for i in range(num_scales * tokens_per_scale)]


@functools.lru_cache(maxsize=1)
def _shapes_tokenizer_json() -> str:
    """Train the word-level shapes tokenizer once per process; return it serialised."""
    from pixellm.data.shapes import shapes_corpus  # late import: data imports this module

    words = sorted(set(shapes_corpus()))  # one line per word: every count is 1, order is fixed
    backend = Tokenizer(WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    trainer = WordLevelTrainer(special_tokens=list(SHAPES_SPECIAL_TOKENS), show_progress=False)
    backend.train_from_iterator(words, trainer=trainer)
    return backend.to_str()


def _shapes_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Build a fresh wrapper around the cached shapes backend (callers add tokens to it)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_shapes_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )


def _local_tokenizer(source: str) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, never from the network."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer source {source!r} is neither 'shapes' nor an existing local directory; "
            "pass the folder that holds tokenizer.json / tokenizer_config.json"
        )
    return transformers.AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False
    )


def load_tokenizer(source: str, codebook_tokens: list[str]) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer and add the image and codebook tokens as special tokens.

    Args:
        source: ``"shapes"`` for the builtin offline word-level tokenizer of the generated shapes
            dataset, otherwise a local directory read with ``AutoTokenizer.from_pretrained``.
        codebook_tokens: Codebook token strings, e.g. from ``codebook_token_strings``.

    Returns:
        The tokenizer; it has a pad token, and ``IMAGE_TOKEN`` and every codebook token map to
        distinct ids different from the unknown id. The same arguments always give the same ids.

    Raises:
        FileNotFoundError: If ``source`` is not "shapes" and not a local directory.
        ValueError: If codebook tokens repeat or any two added ids coincide or equal unk.
    """
    if len(set(codebook_tokens)) != len(codebook_tokens) or IMAGE_TOKEN in codebook_tokens:
        raise ValueError(
            f"codebook tokens must be distinct and differ from {IMAGE_TOKEN!r}: {codebook_tokens}"
        )
    tokenizer = _shapes_tokenizer() if source == "shapes" else _local_tokenizer(source)
    # A codebook token takes the spaces on its left, so "cat: [SEG0] [SEG1]" has no ids for those spaces, as the
    # release's answers have none (its transformers 4.31 slow tokenizer strips the text around added tokens); the
    # space on its right stays with the next word ("[SEG5] and" -> "▁and", as the release's dummy prefix makes it).
    added = [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]
    added += [AddedToken(t, special=True, normalized=False, lstrip=True) for t in codebook_tokens]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": added}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, *codebook_tokens])
    unk = tokenizer.unk_token_id
    if len(set(ids)) != len(ids) or (unk is not None and unk in ids) or None in ids:
        raise ValueError(
            f"tokenizer {source!r}: image/codebook tokens resolve to ids {ids} (unk={unk}); "
            "each must be a distinct, known id"
        )
    return tokenizer
