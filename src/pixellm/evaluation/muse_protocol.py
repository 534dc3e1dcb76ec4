"""The MUSE evaluation protocol (Sec. 4.3) for one question, after its masks are matched.

1. generate the answer (``PixelLMTask``); 2. match predicted to ground-truth masks
(``pixellm.evaluation.matching``); 3. rewrite the answer, each mask reference replaced by its matched
ground truth's "(description [x0,y0,x1,y1])" or "(None [])"; 4. a judge scores each predicted target
1-10 (unmatched: 0) and each pair is weighted by judge / 10 in gIoU and cIoU
(``pixellm.metrics.iou.PairedMaskIoU``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from pixellm.evaluation.judge import MAX_SCORE, AnswerJudge, Judgement
from pixellm.evaluation.matching import MatchedPairs
from pixellm.reliability.codebook_groups import group_spans

NONE_REFERENCE = "(None [])"
SOURCE_KEYS = ("dataset", "json", "record_index", "question_index", "file_name")


def mask_box(mask: Tensor) -> list[int]:
    """[x0, y0, x1, y1] pixel box (inclusive) of the pixels equal to 1 of an (H, W) mask; [] if none."""
    ys, xs = torch.nonzero(mask == 1, as_tuple=True)
    if ys.numel() == 0:
        return []
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def reference_text(description: str, box: list[float]) -> str:
    """"(description [x0,y0,x1,y1])" with the box rounded to whole pixels."""
    return f"({description} [{','.join(str(round(v)) for v in box)}])"


def target_references(meta: dict[str, Any], masks: Tensor) -> list[str]:
    """The reference text of each ground-truth target of a question.

    Args:
        meta: the sample's meta; ``meta["targets"]`` (one {"description", "bbox" xyxy} per mask) is
            used when it holds one entry per mask, else "target k" and the mask's box.
        masks: (G, H, W) ground truth.
    """
    targets = meta.get("targets") or []
    if len(targets) == masks.shape[0]:
        return [reference_text(t["description"], t["bbox"]) for t in targets]
    return [reference_text(f"target {k}", mask_box(m)) for k, m in enumerate(masks)]


def rewrite_answer(answer: str, codebook_tokens: list[str], references: list[str]) -> str:
    """Replace each complete group of codebook tokens by its reference; drop every other codebook token.

    Groups are the complete in-order groups that decoding keeps (``group_spans``), so the k-th
    group is the k-th decoded mask; codebook tokens outside them (a broken-off or out-of-order
    group) made no mask and are removed from the text.

    Args:
        answer: the decoded answer, codebook tokens as their strings.
        codebook_tokens: the L*N codebook token strings, in group order.
        references: one text per complete group, in order.
    """
    pattern, spans = group_spans(answer, codebook_tokens)
    if len(spans) != len(references):
        raise ValueError(f"{len(spans)} codebook groups in the answer but {len(references)} references")
    pieces, start = [], 0
    for (begin, end), text in zip(spans, references, strict=True):
        pieces += [pattern.sub("", answer[start:begin]), text]
        start = end
    pieces.append(pattern.sub("", answer[start:]))
    return re.sub(r" {2,}", " ", "".join(pieces)).strip()


def pair_scores(pairs: MatchedPairs, judgement: Judgement | None) -> Tensor:
    """(M,) weight of each pair: judge / 10, or 1 without a judgement; 0 for an unmatched pair.

    An unmatched pair (a prediction or a ground truth left over by the matching) scores 0 either
    way (Sec. 4.3: "unassigned predictions receiving a score of 0"), so a spurious empty mask, whose
    IoU with the empty mask it is paired with is 1, never adds to gIoU.
    """
    matched = (pairs.pred_index >= 0) & (pairs.gt_index >= 0)
    if judgement is None:
        return matched.double()
    scores = torch.tensor([0.0, *judgement.scores], dtype=torch.float64) / MAX_SCORE  # index 0: no prediction
    return torch.where(matched, scores[pairs.pred_index + 1], torch.zeros(()))


def judge_question(
    judge: AnswerJudge,
    question: str,
    answer: str,
    pairs: MatchedPairs,
    num_predictions: int,
    references: list[str],
    codebook_tokens: list[str],
) -> tuple[str, Judgement]:
    """Steps 3 and 4 for one question: the rewritten answer and the judge's verdict."""
    matched_gt = pairs.gt_of_prediction(num_predictions)
    texts = [NONE_REFERENCE if g is None else references[g] for g in matched_gt]
    rewritten = rewrite_answer(answer, codebook_tokens, texts)
    return rewritten, judge.judge(question, rewritten, [g is not None for g in matched_gt])


def question_record(
    question: str,
    answer: str,
    pairs: MatchedPairs,
    scores: Tensor,
    meta: dict[str, Any],
    rewritten: str | None = None,
    judgement: Judgement | None = None,
) -> dict[str, Any]:
    """The JSON record of one question: enough to re-judge it later without generating again."""
    record: dict[str, Any] = {
        "question": question,
        "answer": answer,
        "num_targets": pairs.num_targets,
        "source": {k: meta[k] for k in SOURCE_KEYS if k in meta},
        "pairs": [
            {"pred": int(p), "gt": int(g), "intersection": float(i), "union": float(u), "score": float(s)}
            for p, g, i, u, s in zip(pairs.pred_index, pairs.gt_index, pairs.intersection, pairs.union, scores, strict=True)
        ],
    }
    if rewritten is not None and judgement is not None:
        record.update(
            rewritten_answer=rewritten,
            judge_prompt=judgement.prompt,
            judge_reply=judgement.reply,
            judge_scores=judgement.scores,
            judge_parsed=judgement.parsed,
        )
    return record


def pairs_of_record(record: dict[str, Any]) -> MatchedPairs:
    """The ``MatchedPairs`` saved in a question record."""
    pairs = record["pairs"]
    return MatchedPairs(
        pred_index=torch.tensor([p["pred"] for p in pairs], dtype=torch.long),
        gt_index=torch.tensor([p["gt"] for p in pairs], dtype=torch.long),
        intersection=torch.tensor([p["intersection"] for p in pairs], dtype=torch.float64),
        union=torch.tensor([p["union"] for p in pairs], dtype=torch.float64),
        num_targets=record["num_targets"],
    )


def rejudge_record(record: dict[str, Any], judge: AnswerJudge) -> dict[str, Any]:
    """A generate-mode record judged again from its saved rewritten answer (no generation)."""
    pairs = pairs_of_record(record)
    num_predictions = int(pairs.pred_index.max().item()) + 1 if len(pairs.pred_index) else 0
    matched = [g is not None for g in pairs.gt_of_prediction(num_predictions)]
    judgement = judge.judge(record["question"], record["rewritten_answer"], matched)
    scores = pair_scores(pairs, judgement)
    source = record.get("source", {})
    return question_record(
        record["question"], record["answer"], pairs, scores, source, record["rewritten_answer"], judgement
    )
