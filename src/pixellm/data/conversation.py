"""Conversation templates: how (question, answer) turns become the LLM's prompt and target text.

Four templates exist, chosen by name:

- ``"llava_v1"`` (LLaVA v1 / Vicuna, the 7B base model): the system prompt, then
  `` USER: <image>\\n{question} ASSISTANT:``; later turns ``USER: {question} ASSISTANT:``.
- ``"llama_2"`` (LLaVA's Llama-2 chat, the 13B base model): ``[INST] <<SYS>>\\n{system}\\n<</SYS>>
  \\n\\n<image>\\n{question} [/INST]``; later turns ``[INST] {question} [/INST]``, each opened with
  the begin-of-sequence token.
- ``"plain"``: ``USER: <image>\\n{question} ASSISTANT:`` (no system prompt; used by the tiny
  shapes models, whose vocabulary is small).
- ``"llava_v1_im_start_end"``: ``"llava_v1"`` with the image between ``<im_start>`` and ``<im_end>``,
  as the released PixelLM trains and answers (its ``use_mm_start_end``, on by default, and its
  tokenizer holds both as special tokens); for models converted from the release.

A turn's prompt always ends right before its answer, so the text a model sees when it generates
is exactly the prefix it was trained on. The answer follows (its ``{seg}`` placeholders replaced by
codebook tokens) and the caller closes it with the end-of-sequence id (the ``</s>`` of LLaVA).
The image token appears once, in the first turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixellm.tokenizer import IMAGE_TOKEN

SEG_PLACEHOLDER = "{seg}"
IM_START, IM_END = "<im_start>", "<im_end>"  # around the image in the release's prompts (LLaVA's names)

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """The text around each turn of a conversation.

    Attributes:
        first_turn: Prompt of the first turn with ``{question}``; holds the system prompt and the
            image token.
        next_turn: Prompt of every later turn with ``{question}``.
        bos_each_turn: Whether every later turn starts with the begin-of-sequence token (Llama-2
            chat closes a turn with ``</s>`` and opens the next with ``<s>``).
        special_tokens: Tokens of the template (besides the image token) that the tokenizer must
            hold as single tokens.
    """

    first_turn: str
    next_turn: str
    bos_each_turn: bool = False
    special_tokens: tuple[str, ...] = ()  # tokens of the text the tokenizer must hold as single tokens


TEMPLATES: dict[str, ConversationTemplate] = {
    "llava_v1": ConversationTemplate(
        LLAVA_SYSTEM + " USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:",
        "USER: {question} ASSISTANT:",
    ),
    "llama_2": ConversationTemplate(
        "[INST] <<SYS>>\n" + LLAMA_2_SYSTEM + "\n<</SYS>>\n\n" + IMAGE_TOKEN + "\n{question} [/INST]",
        "[INST] {question} [/INST]",
        bos_each_turn=True,
    ),
    "plain": ConversationTemplate(
        "USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:",
        "USER: {question} ASSISTANT:",
    ),
    "llava_v1_im_start_end": ConversationTemplate(
        LLAVA_SYSTEM + " USER: " + IM_START + IMAGE_TOKEN + IM_END + "\n{question} ASSISTANT:",
        "USER: {question} ASSISTANT:",
        special_tokens=(IM_START, IM_END),
    ),
}
SHAPES_TEMPLATES = ("llava_v1", "plain")  # the templates the shapes tokenizer's vocabulary covers


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name``.

    Raises:
        ValueError: If the name is unknown (lists the known ones).
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def turn_prompts(template: str, questions: list[str]) -> list[str]:
    """The prompt text of each turn, in order; only the first holds the image token.

    Args:
        template: A key of ``TEMPLATES``.
        questions: The user's questions of the conversation, oldest first, without image tokens.

    Raises:
        ValueError: If the template name is unknown or a question contains the image token.
    """
    chosen = get_template(template)
    for question in questions:
        if IMAGE_TOKEN in question:
            raise ValueError(f"question must not contain {IMAGE_TOKEN!r}: {question!r}")
    return [
        (chosen.first_turn if turn == 0 else chosen.next_turn).format(question=question)
        for turn, question in enumerate(questions)
    ]


def build_prompt(template: str, question: str) -> str:
    """Return the prompt text of a one-turn conversation; it holds exactly one image token.

    Args:
        template: A key of ``TEMPLATES`` ("llava_v1", "llama_2" or "plain").
        question: The user's question, without an image token.

    Raises:
        ValueError: If the template name is unknown or the question contains the image token.
    """
    return turn_prompts(template, [question])[0]


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
    """Return the raw text of the templates the shapes tokenizer covers (its closed vocabulary)."""
    return [TEMPLATES[name].first_turn for name in SHAPES_TEMPLATES]
