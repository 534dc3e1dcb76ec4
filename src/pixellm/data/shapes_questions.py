"""Questions and answers about one generated shapes image (the closed language of the dataset).

Every question is unambiguous by construction: a referring phrase is asked only when exactly one
shape fits it, and a superlative ("leftmost", "largest") only when the winner leads by a clear
margin. About one question in ten is a "none" question whose answer names a missing object and
has no targets. Answers list their targets left to right by mask centroid.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

KINDS = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}
SIDES = {
    "left": ("leftmost", 0, 1.0),
    "right": ("rightmost", 0, -1.0),
    "top": ("topmost", 1, 1.0),
    "bottom": ("bottommost", 1, -1.0),
}

DIRECT = ("segment the {desc}.", "please segment the {desc}.", "where is the {desc}?")
EVERY_KIND = ("segment every {kind}.", "segment all the {kinds}.")
ALL_COLOUR = "segment all the {colour} shapes."
ALL_COLOUR_KIND = "segment all the {colour} {kinds}."
ALL_SIZE = "segment all the {size} shapes."
ALL_SIZE_KIND = "segment all the {size} {kinds}."
NOT_KIND = "segment every shape that is not a {kind}."
REASONING = {
    "which of these could roll?": lambda s: s.kind == "circle",
    "which shapes have no corners?": lambda s: CORNERS[s.kind] == 0,
    "which shapes have three corners?": lambda s: CORNERS[s.kind] == 3,
    "which shapes have four corners?": lambda s: CORNERS[s.kind] == 4,
}
EXTREME = "segment the {word} {noun}."
TWO_LARGEST = "segment the two largest {colour} shapes."
NONE_ANSWER = "there is no {desc}."
ANSWER_ITEM = "{name} {{seg}}"

SIZE_RATIO = 0.7  # a size superlative needs winner area <= 0.7 x runner-up (or the inverse)
POSITION_GAP = 0.06  # a position superlative needs a centroid lead of 6 % of the image side
NONE_PROBABILITY = 0.1
SHARED_COLOUR_BOOST = 3.0  # prefer questions whose targets share a colour with a non-target
TYPE_WEIGHTS = {
    "direct": 3.0,
    "kind": 2.0,
    "colour": 0.7,
    "colour_kind": 1.5,
    "size": 1.0,
    "not_kind": 1.0,
    "reasoning": 2.0,
    "extreme": 2.0,
    "two_largest": 1.0,
}


@dataclass(frozen=True)
class VisibleShape:
    """A drawn shape as the questions see it: attributes plus visible area and centroid (x, y)."""

    kind: str
    colour: str
    size: str
    area: int
    centroid: tuple[float, float]

    @property
    def name(self) -> str:
        """The full referring phrase, also used as the MUSE ``rephrased_name``."""
        return f"the {self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class QA:
    """One question: its text, target indices in text order, and answer with ``{seg}`` slots."""

    question: str
    targets: tuple[int, ...]
    answer: str


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answer_for(shapes: list[VisibleShape], targets: list[int]) -> tuple[tuple[int, ...], str]:
    """Order ``targets`` left to right and build their answer text with one ``{seg}`` each."""
    order = tuple(sorted(targets, key=lambda i: (shapes[i].centroid[0], shapes[i].centroid[1])))
    return order, _join([ANSWER_ITEM.format(name=shapes[i].name) for i in order]) + "."


def _unique_description(shapes: list[VisibleShape], i: int) -> str | None:
    """Shortest phrase naming shape ``i`` and no other (always includes the kind)."""
    s = shapes[i]
    for fields in (("colour",), ("size",), ("size", "colour")):
        key = tuple(getattr(s, f) for f in fields) + (s.kind,)
        if sum(tuple(getattr(o, f) for f in fields) + (o.kind,) == key for o in shapes) == 1:
            return " ".join(key)
    return None


def _extreme(values: list[float], lower_is_winner: bool, margin: float, ratio: bool) -> int | None:
    """Index of the clear winner of ``values`` (min or max) or None when it is a near tie."""
    order = np.argsort(values) if lower_is_winner else np.argsort(values)[::-1]
    if len(order) < 2:
        return None
    best, second = values[order[0]], values[order[1]]
    if ratio:
        small, big = (best, second) if lower_is_winner else (second, best)
        clear = small <= SIZE_RATIO * big
    else:
        clear = abs(best - second) >= margin
    return int(order[0]) if clear else None


def _candidates(shapes: list[VisibleShape], image_size: int) -> list[tuple[str, str, list[int]]]:
    """Every answerable (type, question, targets) for this image."""
    out: list[tuple[str, str, list[int]]] = []
    idx = range(len(shapes))
    for i in idx:
        desc = _unique_description(shapes, i)
        if desc is not None:
            out += [("direct", t.format(desc=desc), [i]) for t in DIRECT]
    for kind in sorted({s.kind for s in shapes}):
        members = [i for i in idx if shapes[i].kind == kind]
        out += [("kind", t.format(kind=kind, kinds=PLURALS[kind]), members) for t in EVERY_KIND]
        rest = [i for i in idx if shapes[i].kind != kind]
        if rest:
            out.append(("not_kind", NOT_KIND.format(kind=kind), rest))
    for colour in sorted({s.colour for s in shapes}):
        members = [i for i in idx if shapes[i].colour == colour]
        out.append(("colour", ALL_COLOUR.format(colour=colour), members))
        by_area = sorted(members, key=lambda i: -shapes[i].area)
        if len(members) >= 3 and shapes[by_area[2]].area <= SIZE_RATIO * shapes[by_area[1]].area:
            out.append(("two_largest", TWO_LARGEST.format(colour=colour), by_area[:2]))
    for colour, kind in sorted({(s.colour, s.kind) for s in shapes}):
        members = [i for i in idx if (shapes[i].colour, shapes[i].kind) == (colour, kind)]
        if len(members) >= 2:
            out.append(
                ("colour_kind", ALL_COLOUR_KIND.format(colour=colour, kinds=PLURALS[kind]), members)
            )
    for size in sorted({s.size for s in shapes}):
        members = [i for i in idx if shapes[i].size == size]
        out.append(("size", ALL_SIZE.format(size=size), members))
        for kind in sorted({shapes[i].kind for i in members}):
            kind_members = [i for i in members if shapes[i].kind == kind]
            out.append(("size", ALL_SIZE_KIND.format(size=size, kinds=PLURALS[kind]), kind_members))
    for question, test in REASONING.items():
        members = [i for i in idx if test(shapes[i])]
        if members:
            out.append(("reasoning", question, members))
    out += _extreme_candidates(shapes, image_size)
    return out


def _extreme_candidates(
    shapes: list[VisibleShape], image_size: int
) -> list[tuple[str, str, list[int]]]:
    """Superlatives over all shapes and within one kind or colour."""
    groups: list[tuple[str, list[int]]] = [("shape", list(range(len(shapes))))]
    groups += [(k, [i for i, s in enumerate(shapes) if s.kind == k]) for k in KINDS]
    groups += [(f"{c} shape", [i for i, s in enumerate(shapes) if s.colour == c]) for c in COLOURS]
    out: list[tuple[str, str, list[int]]] = []
    for noun, members in groups:
        if len(members) < 2:
            continue
        for word, axis, sign in SIDES.values():
            values = [sign * shapes[i].centroid[axis] for i in members]
            win = _extreme(values, True, POSITION_GAP * image_size, ratio=False)
            if win is not None:
                out.append(("extreme", EXTREME.format(word=word, noun=noun), [members[win]]))
        areas = [float(shapes[i].area) for i in members]
        for word, lower in (("smallest", True), ("largest", False)):
            win = _extreme(areas, lower, 0.0, ratio=True)
            if win is not None:
                out.append(("extreme", EXTREME.format(word=word, noun=noun), [members[win]]))
    return out


def _none_question(shapes: list[VisibleShape], rng: np.random.Generator) -> QA:
    """A question about a colour+kind that is absent from the image."""
    present = {(s.colour, s.kind) for s in shapes}
    absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
    colour, kind = absent[rng.integers(len(absent))]
    desc = f"{colour} {kind}"
    question = DIRECT[rng.integers(len(DIRECT))].format(desc=desc)
    return QA(question, (), NONE_ANSWER.format(desc=desc))


def make_questions(
    shapes: list[VisibleShape], image_size: int, num_questions: int, rng: np.random.Generator
) -> list[QA]:
    """Draw ``num_questions`` distinct questions about ``shapes``.

    Args:
        shapes: The visible shapes of one image (at least one).
        image_size: Image side in pixels (scales the position tie margin).
        num_questions: How many questions to draw (fewer if the image allows fewer).
        rng: Random generator; the result is a pure function of its state and the inputs.

    Returns:
        Questions with targets in text order (left to right); none-questions have no targets.
    """
    candidates = _candidates(shapes, image_size)
    by_type: dict[str, list[tuple[str, list[int]]]] = {}
    for kind, question, targets in candidates:
        by_type.setdefault(kind, []).append((question, targets))
    out: list[QA] = []
    asked: set[str] = set()
    for _ in range(num_questions):
        if rng.random() < NONE_PROBABILITY:
            qa = _none_question(shapes, rng)
        else:
            types = [t for t in by_type if any(q not in asked for q, _ in by_type[t])]
            if not types:
                break
            weights = np.array([TYPE_WEIGHTS[t] for t in types])
            chosen = types[rng.choice(len(types), p=weights / weights.sum())]
            options = [(q, t) for q, t in by_type[chosen] if q not in asked]
            boost = np.array(
                [SHARED_COLOUR_BOOST if shares_colour(shapes, t) else 1.0 for _, t in options]
            )
            question, targets = options[rng.choice(len(options), p=boost / boost.sum())]
            order, answer = answer_for(shapes, targets)
            qa = QA(question, order, answer)
        if qa.question not in asked:
            asked.add(qa.question)
            out.append(qa)
    return out


def shares_colour(shapes: list[VisibleShape], targets: list[int] | tuple[int, ...]) -> bool:
    """Whether some target has the colour of some non-target (colour alone cannot find it)."""
    others = {s.colour for i, s in enumerate(shapes) if i not in targets}
    return any(shapes[i].colour in others for i in targets)


def question_corpus() -> Iterator[str]:
    """Yield every text fragment the questions and answers can contain (for the vocabulary)."""
    yield from DIRECT
    yield from EVERY_KIND
    yield from (
        ALL_COLOUR,
        ALL_COLOUR_KIND,
        ALL_SIZE,
        ALL_SIZE_KIND,
        NOT_KIND,
        EXTREME,
        TWO_LARGEST,
    )
    yield from REASONING
    yield from (NONE_ANSWER, ANSWER_ITEM, "the , and . shape shapes")
    yield from (*KINDS, *PLURALS.values(), *COLOURS, *SIZES)
    yield from (word for word, _, _ in SIDES.values())
    yield from ("smallest", "largest")


def split_words(text: str) -> list[str]:
    """Split like the ``Whitespace`` pre-tokenizer, without the ``{field}`` slots."""
    return re.findall(r"\w+|[^\w\s]+", re.sub(r"\{+\w*\}+", " ", text))
