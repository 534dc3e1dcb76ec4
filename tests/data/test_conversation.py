"""Tests of the conversation templates: exact prompt texts, turns, the image token, answers."""

from __future__ import annotations

import pytest

from pixellm.data.conversation import (
    LLAVA_SYSTEM,
    build_prompt,
    fill_answer,
    template_words,
    turn_prompts,
)
from pixellm.tokenizer import IMAGE_TOKEN


def test_one_turn_prompts() -> None:
    assert build_prompt("plain", "q?") == f"USER: {IMAGE_TOKEN}\nq? ASSISTANT:"
    assert build_prompt("llava_v1", "q?") == f"{LLAVA_SYSTEM} USER: {IMAGE_TOKEN}\nq? ASSISTANT:"
    llama = build_prompt("llama_2", "q?")
    assert llama.startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert llama.endswith(f"natural language.\n<</SYS>>\n\n{IMAGE_TOKEN}\nq? [/INST]")


@pytest.mark.parametrize(
    ("template", "later"),
    [("plain", "USER: b? ASSISTANT:"), ("llava_v1", "USER: b? ASSISTANT:"), ("llama_2", "[INST] b? [/INST]")],
)
def test_only_the_first_turn_holds_the_image(template: str, later: str) -> None:
    first, second = turn_prompts(template, ["a?", "b?"])
    assert first == build_prompt(template, "a?") and second == later
    assert first.count(IMAGE_TOKEN) == 1 and IMAGE_TOKEN not in second


def test_answers_and_errors() -> None:
    assert fill_answer("a {seg} and b {seg}.", ["[A]", "[B]"]) == "a [A] [B] and b [A] [B]."
    assert fill_answer("none.", ["[A]"]) == "none."
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        build_prompt("vicuna", "q")
    with pytest.raises(ValueError, match="must not contain"):
        turn_prompts("plain", ["a", f"look at {IMAGE_TOKEN}"])


def test_the_shapes_vocabulary_covers_only_plain_and_llava() -> None:
    assert template_words() == [build_prompt("llava_v1", "{question}"), build_prompt("plain", "{question}")]
