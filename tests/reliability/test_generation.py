"""Generation faults: partial codebook groups, codebook tokens without an image, no targets."""

from __future__ import annotations

import pytest
import torch

from pixellm.data.errors import DataError
from pixellm.data.preprocess import TextEncoder
from pixellm.reliability.codebook_groups import drop_malformed_groups


@pytest.fixture(scope="module")
def task_and_batch(tiny_config, build):
    torch.manual_seed(0)
    task, data = build(tiny_config)
    data.prepare_data()
    data.setup("fit")
    return task.eval(), next(iter(data.predict_dataloader()))


def _generate(task, batch, rows: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``predict_step`` with the LLM's generation replaced by ``rows`` (one per question)."""
    ids = torch.tensor(rows)  # (B, n)
    states = torch.randn(*ids.shape, task.lmm.hidden_size)  # (B, n, H)
    monkeypatch.setattr(task.lmm, "generate", lambda inputs, n, eos_id, **options: (ids, states))
    with torch.no_grad():
        return task.predict_step(batch, 0)


def test_codebook_count_not_a_multiple_of_the_group_keeps_whole_groups(task_and_batch, monkeypatch):
    task, batch = task_and_batch
    code, eos = task.codebook.token_ids.tolist(), task.tokenizer.eos_token_id
    word = task.tokenizer.convert_tokens_to_ids("the")
    rows = [[word, *code, *code, *code[:3], eos]]  # 15 codebook tokens, L*N = 6
    rows += [[word] + [eos] * (len(rows[0]) - 1)] * (batch["input_ids"].shape[0] - 1)
    out = _generate(task, batch, rows, monkeypatch)
    assert out[0]["masks"].shape[0] == 2 and out[0]["dropped_codebook_tokens"] == 3
    assert [o["dropped_codebook_tokens"] for o in out[1:]] == [0] * (len(out) - 1)
    with pytest.raises(ValueError, match=r"sequences \[0\] hold \[15\] codebook tokens, not a multiple of L\*N = 6"):
        task.codebook.gather(torch.randn(1, len(rows[0]), task.lmm.hidden_size), torch.tensor(rows[:1]))


def test_zero_targets_generated_gives_empty_mask_stacks(task_and_batch, monkeypatch):
    task, batch = task_and_batch
    word, eos = task.tokenizer.convert_tokens_to_ids("the"), task.tokenizer.eos_token_id
    out = _generate(task, batch, [[word, word, eos]] * batch["input_ids"].shape[0], monkeypatch)
    sizes = batch["original_sizes"].tolist()
    assert [tuple(o["masks"].shape) for o in out] == [(0, h, w) for h, w in sizes]
    assert all(o["dropped_codebook_tokens"] == 0 and o["answer"] == "the the" for o in out)


def test_codebook_tokens_without_an_image_are_refused(task_and_batch):
    task, batch = task_and_batch
    broken = dict(batch)
    ids = batch["input_ids"].clone()
    ids[ids == task.image_token_id] = int(task.codebook.token_ids[0])  # image token -> [SEG0]
    broken["input_ids"] = ids
    with pytest.raises(ValueError, match="every sequence needs exactly one image token"):
        task.encode(broken, with_labels=False)
    encoder = TextEncoder(task.tokenizer, task.codebook.tokens, "plain")
    with pytest.raises(DataError, match="must hold exactly one '<image>'"):
        encoder.encode("where?", "it {seg} <image>", 1)


def test_only_whole_in_order_groups_are_kept() -> None:
    code = torch.tensor([10, 11, 12, 13])  # L*N = 4
    ids = torch.tensor([
        [1, 10, 11, 2, 12, 13, 3, 0],  # one group with words between its tokens: kept
        [10, 11, 10, 11, 12, 13, 12, 0],  # a broken-off start, a group, a stray token
        [13, 12, 11, 10, 10, 11, 12, 0],  # reversed, then an unfinished group
    ])
    kept, dropped = drop_malformed_groups(ids, code, filler=0)
    assert kept.tolist() == [
        [1, 10, 11, 2, 12, 13, 3, 0],
        [0, 0, 10, 11, 12, 13, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert dropped.tolist() == [0, 3, 7]


def test_a_broken_off_group_never_becomes_a_target(task_and_batch, monkeypatch):
    task, batch = task_and_batch
    code, eos = task.codebook.token_ids.tolist(), task.tokenizer.eos_token_id
    word = task.tokenizer.convert_tokens_to_ids("the")
    rows = [[word, *code[:3], word, *code, eos]]  # 9 codebook tokens: by count, 1 mixed-up group
    rows += [[word] + [eos] * (len(rows[0]) - 1)] * (batch["input_ids"].shape[0] - 1)
    states = torch.randn(len(rows), len(rows[0]), task.lmm.hidden_size)
    monkeypatch.setattr(task.lmm, "generate", lambda inputs, n, eos_id, **options: (torch.tensor(rows), states))
    with torch.no_grad():
        out = task.predict_step(batch, 0)
        gathered = task.codebook.gather(states[:1, 5:11], torch.tensor(rows)[:1, 5:11])
    assert out[0]["masks"].shape[0] == 1 and out[0]["dropped_codebook_tokens"] == 3
    features, _ = task.encode(batch, with_labels=False)
    gathered.batch_index = torch.zeros(1, dtype=torch.long)  # the whole group's own states
    with torch.no_grad():
        expected = task.decode_masks(features, gathered, batch)[0] > 0
    assert torch.equal(out[0]["masks"], expected)


def llama_like_tokenizer(folder, pieces: list[str]):
    """A SentencePiece-style (Metaspace) tokenizer of ``pieces``, saved in ``folder`` and loaded with the six
    codebook tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pixellm.tokenizer import codebook_token_strings, load_tokenizer

    model = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(["<unk>", "<s>", "</s>", *pieces])}, merges=[],
                                 unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    tokens = codebook_token_strings(2, 3)
    return load_tokenizer(str(folder), tokens), tokens


def test_codebook_strings_spelled_by_ordinary_pieces_are_not_targets(tmp_path):
    """A Llama-like tokenizer can spell ``[SEG0]`` with ordinary pieces: the text must not show it as a target."""
    from pixellm.inference.answer import number_targets
    from pixellm.reliability.codebook_groups import codebook_pattern, decode_answer

    pieces = ["▁the", "▁cat", "▁dog", "▁and", "▁[", "SE", "G", *"012345", "]", "."]
    tokenizer, tokens = llama_like_tokenizer(tmp_path / "llama_like", pieces)
    code = tokenizer.convert_tokens_to_ids(tokens)
    words = tokenizer.convert_tokens_to_ids
    spelled = [i for k in range(6) for i in words(["▁[", "SE", "G", str(k), "]"])]  # ordinary ids only
    ids = words(["▁the", "▁cat"]) + spelled + words(["▁and", "▁the", "▁dog"]) + code + words(["."])
    text = decode_answer(tokenizer, ids, code)
    assert len(codebook_pattern(tokens).findall(tokenizer.decode(ids))) == 12  # plain decoding shows two groups
    assert len(codebook_pattern(tokens).findall(text)) == 6  # ours: only the codebook ids' group
    numbered = number_targets(text, tokens)
    assert len(numbered.labels) == 1 and numbered.text.endswith("and the dog [1].")  # one target: the dog's
    # the same text otherwise, but for a space before each codebook token (they take the spaces on their left)
    glued = lambda t: t.replace(" [SEG", "[SEG")  # noqa: E731
    assert glued(text.replace("[ SEG", "[SEG")) == glued(tokenizer.decode(ids))
    plain = words(["▁the", "▁cat"]) + code + words(["."])
    assert tokenizer.decode(plain) == "the cat" + "".join(tokens) + "."
    assert decode_answer(tokenizer, plain, code) == "the cat " + " ".join(tokens) + "."


def test_runs_that_read_differently_in_context_are_decoded_apart():
    """When the ordinary runs, decoded alone, do not add up to the text's codebook strings, the answer is
    rebuilt run by run: ordinary runs neutralised, codebook ids as they are."""
    from pixellm.reliability.codebook_groups import decode_answer

    class ContextTokenizer:  # decodes a whole answer with a clean-up that a run alone does not get
        pieces = {0: "[SEG0]", 1: "[SE", 2: "G0]", 3: " x"}

        def decode(self, ids):
            text = "".join(self.pieces[i] for i in ids)
            return text.replace("[SEG0] x[", "[SE G0] x[") if len(ids) > 3 else text  # 1 string fewer in context

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    ids = [1, 2, 3, 0, 3]  # spelled "[SEG0]", " x", the codebook id, " x"
    assert decode_answer(ContextTokenizer(), ids, [0]) == "[ SEG0] x [SEG0] x"  # a space before a codebook token


@pytest.mark.parametrize("tokenizer_kind", ["llama_like", "shapes", "spaces_kept"])
def test_the_spelled_group_is_how_encoded_answers_hold_every_group(tmp_path, tokenizer_kind):
    """Generation completes a group as ``spelled_group`` gives it: the ids training answers hold from a group's
    first codebook token to its last. ``load_tokenizer``'s codebook tokens take the spaces on their left, so
    those are the six codebook ids alone, as in the release's answers; a tokenizer whose codebook tokens keep
    the spaces holds a SentencePiece ``▁`` between them, and the group holds it too."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from pixellm.reliability.codebook_groups import spelled_group
    from pixellm.tokenizer import IMAGE_TOKEN, codebook_token_strings, load_tokenizer

    tokens = codebook_token_strings(2, 3)
    pieces = ["▁", "▁the", "▁cat", "▁dog", "▁and", ".", ":"]
    if tokenizer_kind == "llama_like":
        tokenizer, _ = llama_like_tokenizer(tmp_path / "llama_like", pieces)
    elif tokenizer_kind == "shapes":  # splits at whitespace: no id for a space anywhere
        tokenizer = load_tokenizer("shapes", tokens)
    else:
        llama_like_tokenizer(tmp_path / "llama_like", pieces)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "llama_like")
        tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                                    for t in [IMAGE_TOKEN, *tokens]]})
    code = tokenizer.convert_tokens_to_ids(tokens)
    group = spelled_group(tokenizer, tokens)
    space = tokenizer.convert_tokens_to_ids("▁")
    assert group == ([i for c in code for i in (c, space)][:-1] if tokenizer_kind == "spaces_kept" else code)
    encoded = TextEncoder(tokenizer, tokens, "plain").encode("the cat and the dog", "the cat: {seg} and the dog {seg}.", 2)
    ids = encoded.input_ids
    starts = [p for p, i in enumerate(ids) if i == code[0]]
    assert len(starts) == 2 and all(ids[p : p + len(group)] == group for p in starts)
    if tokenizer_kind == "llama_like":  # the word after a group keeps its space, as the release's "▁and"
        assert tokenizer.convert_ids_to_tokens(ids[starts[0] + len(group)]).startswith("▁")
        with pytest.raises(ValueError, match="tokenises to codebook ids"):  # the saved tokenizer, no codebook tokens
            spelled_group(PreTrainedTokenizerFast.from_pretrained(tmp_path / "llama_like"), tokens)
