"""Conversation templates: how a (question, answer) pair becomes the LLM's prompt and target text.

Two templates exist, chosen by name:

- ``"llava_v1"``: LLaVA v1's system prompt, then `` USER: <image>\\n{question} ASSISTANT:``.
- ``"plain"``: ``USER: <image>\\n{question} ASSISTANT:`` (no system prompt; used by the tiny
  shapes models, whose vocabulary is small).

The prompt always ends right after ``ASSISTANT:`` so that the text a model sees when it generates
is exactly the prefix it was trained on. The answer follows (its ``{seg}`` placeholders replaced by
codebook tokens) and the caller closes it with the end-of-sequence id (the ``</s>`` of LLaVA).
"""

from __future__ import annotations

from pixellm.tokenizer import IMAGE_TOKEN

SEG_PLACEHOLDER = "{seg}"

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

PROMPT_TEMPLATES: dict[str, str] = {
    "llava_v1": LLAVA_SYSTEM + " USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:",
    "plain": "USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:",
}


def build_prompt(template: str, question: str) -> str:
    """Return the prompt text for ``question``; it holds exactly one image token.

    Args:
        template: A key of ``PROMPT_TEMPLATES`` ("llava_v1" or "plain").
        question: The user's question, without an image token.

    Raises:
        ValueError: If the template name is unknown or the question contains the image token.
    """
    if template not in PROMPT_TEMPLATES:
        raise ValueError(
            f"unknown conversation template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}"
        )
    if IMAGE_TOKEN in question:
        raise ValueError(f"question must not contain {IMAGE_TOKEN!r}: {question!r}")
    return PROMPT_TEMPLATES[template].format(question=question)


def fill_answer(answer: str, codebook_tokens: list[str]) -> str:
    """Replace each ``{seg}`` of ``answer`` by all codebook tokens joined by spaces.

    Args:
        answer: Answer text with one ``{seg}`` placeholder per target.
        codebook_tokens: The L·N codebook token strings, scale-major.

    Returns:
        The answer with one group of L·N tokens per target, e.g. ``"the cat [SEG0] ... [SEG5]."``.
    """
    return answer.replace(SEG_PLACEHOLDER, " ".join(codebook_tokens))


def template_words() -> list[str]:
    """Return the raw text of every template (for building a closed vocabulary)."""
    return list(PROMPT_TEMPLATES.values())
