"""Questions and answers of the segmentation datasets (refCOCO family, semantic seg, ReasonSeg).

The template lists are the released PixelLM/LISA ones (``utils/utils.py``: SHORT_QUESTION_LIST,
LONG_QUESTION_LIST, ANSWER_LIST, SINGLE_ANSWER_LIST, MULTI_ANSWER_LIST), with our ``{seg}``
placeholder (one per target) in place of ``[SEG]``. Training draws a template per question;
evaluation uses the release's fixed prompt. Names go in with ``str.replace``, never
``str.format``, so braces in a name cannot break a template.
"""

from __future__ import annotations

import numpy as np

from pixellm.data.conversation import SEG_PLACEHOLDER

NAME = "{class_name}"
SENTENCE = "{sent}"
SEGS = "{segs}"

SHORT_QUESTIONS = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
ANSWERS = (
    "It is {seg}.",
    "Sure, {seg}.",
    "Sure, it is {seg}.",
    "Sure, the segmentation result is {seg}.",
    "{seg}.",
)
SINGLE_ANSWERS = (
    "{class_name} is {seg}.",
    "The segmentation result of {class_name} is {seg}.",
    "{seg}.",
)
MULTI_ANSWERS = (
    "{class_name} are {segs}, separately.",
    "{class_name} are {segs}.",
    "Sure, {class_name} are {segs}, separately.",
    "Sure, {class_name} are {segs}.",
    "the segmentation result of {class_name} are {segs}.",
    "the segmentation result of {class_name} are {segs}, separately.",
    "Sure, the segmentation result of {class_name} are {segs}.",
    "Sure, the segmentation result of {class_name} are {segs}, separately.",
    "Sure, they are {segs}.",
    "They are {segs}.",
    "{segs}.",
)
EVAL_QUESTION = "What is {class_name} in this image? Please output segmentation mask."  # release
EVAL_SENTENCE_QUESTION = (
    "{class_name} Please output segmentation mask."  # release; the phrase is a sentence
)
PAPER_MULTI_QUESTION = "Please segment the {class_name}."  # Sec. 5.1, multi-referring


def join_phrases(phrases: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def placeholders(count: int) -> str:
    """``count`` ``{seg}`` placeholders joined like names: ``"{seg}, {seg} and {seg}"``."""
    return join_phrases([SEG_PLACEHOLDER] * count)


def group_targets(
    num_candidates: int, max_questions: int, max_targets: int, rng: np.random.Generator
) -> list[list[int]]:
    """Split candidate targets into questions as the release does (``allocate_class``).

    Up to ``max_questions * max_targets`` candidates are drawn without replacement (all of them
    when there are fewer), shuffled, and dealt out: each goes to a random empty question while one
    is empty, then to a random question that is not full. Every question gets at least one target.

    Args:
        num_candidates: How many candidate targets (sentences, classes) the image has.
        max_questions: Most questions per image (release: 3).
        max_targets: Most targets per question (release: 3).
        rng: The generator of this image.

    Returns:
        ``min(max_questions, drawn)`` lists of candidate indices, each in dealing order.
    """
    budget = max_questions * max_targets
    drawn = (
        rng.choice(num_candidates, size=budget, replace=False).tolist()
        if num_candidates >= budget
        else list(range(num_candidates))
    )
    rng.shuffle(drawn)
    groups: list[list[int]] = [[] for _ in range(min(max_questions, len(drawn)))]
    for candidate in drawn:
        sizes = np.array([len(g) for g in groups])
        open_groups = (
            np.flatnonzero(sizes == 0)
            if (sizes == 0).any()
            else np.flatnonzero(sizes < max_targets)
        )
        groups[int(rng.choice(open_groups))].append(candidate)
    return groups


def training_prompt(names: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """A random (question, answer) about ``names`` with one ``{seg}`` per name, in name order.

    As released: the question is a SHORT_QUESTIONS template with the lower-cased joined names;
    one name gets an ANSWERS template; several get, with equal chance, per-name SINGLE_ANSWERS
    ("A is {seg}, B is {seg} and C is {seg}.") or a MULTI_ANSWERS template.
    """
    joined = join_phrases(names).lower()
    question = str(rng.choice(SHORT_QUESTIONS)).replace(NAME, joined)
    if len(names) == 1:
        return question, str(rng.choice(ANSWERS))
    if rng.integers(2):
        template = str(rng.choice(SINGLE_ANSWERS))
        parts = [template.replace(NAME, name)[:-1] for name in names]  # without the final "."
        return question, join_phrases(parts) + "."
    template = str(rng.choice(MULTI_ANSWERS))
    return question, template.replace(NAME, joined).replace(SEGS, placeholders(len(names)))


def wrap_sentence(templates: tuple[str, ...], sentence: str, rng: np.random.Generator) -> str:
    """``sentence`` in one of ``templates`` (each holding ``{sent}``), drawn with ``rng``."""
    return str(rng.choice(templates)).replace(SENTENCE, sentence)


def sentence_prompt(sentence: str, rng: np.random.Generator) -> tuple[str, str]:
    """A random (question, answer) for a reasoning sentence: LONG_QUESTIONS and ANSWERS."""
    return wrap_sentence(LONG_QUESTIONS, sentence, rng), str(rng.choice(ANSWERS))


def eval_prompt(names: list[str], template: str = EVAL_QUESTION) -> tuple[str, str]:
    """The fixed evaluation (question, answer): ``template`` with the joined names, and
    ``"{seg}, {seg} and {seg}."``."""
    return template.replace(NAME, join_phrases(names)), placeholders(len(names)) + "."
