"""MUSE protocol: answer rewriting, per-pair judge weights, records that re-judge, the table."""

from __future__ import annotations

import math

import pytest
import torch

from pixellm.evaluation.judge import AnswerJudge, IoUOnlyJudge, Judgement
from pixellm.evaluation.matching import match_batch
from pixellm.evaluation.muse_protocol import (
    judge_question,
    mask_box,
    pair_scores,
    question_record,
    rewrite_answer,
    target_references,
)
from pixellm.evaluation.report import (
    SplitResult,
    markdown_table,
    read_split_json,
    rejudge_split,
    scores_of_records,
    write_split_json,
)
from pixellm.metrics.iou import PairedMaskIoU
from pixellm.reliability.codebook_groups import drop_malformed_groups

TOKENS = ["[SEG0]", "[SEG1]"]  # L*N = 2 for brevity


class FixedJudge(AnswerJudge):
    label = "fixed"

    def judge(self, question, rewritten_answer, matched):
        return Judgement([5 if m else 0 for m in matched], prompt=f"grade: {rewritten_answer}", reply="[5]")


def test_rewrite_replaces_each_complete_group_and_drops_an_incomplete_tail():
    answer = "sit in the kayak [SEG0] [SEG1] , hold the paddle [SEG0] x [SEG1] and [SEG0]"
    out = rewrite_answer(answer, TOKENS, ["(a red kayak [1,2,30,40])", "(None [])"])
    assert out == "sit in the kayak (a red kayak [1,2,30,40]) , hold the paddle (None []) and"
    with pytest.raises(ValueError, match="2 codebook groups in the answer but 1 references"):
        rewrite_answer(answer, TOKENS, ["(x [])"])


def test_rewrite_skips_broken_groups_as_decoding_does():
    """A broken-off group made no mask: its tokens go, and the next whole group keeps its own reference."""
    tokens = ["[A]", "[B]", "[C]"]
    answer = "cup is [A] [B] , plate is [A] [B] [C] and fork is [C] [A] [B] [C] ."
    out = rewrite_answer(answer, tokens, ["(plate [0,0,1,1])", "(fork [2,2,3,3])"])
    assert out == "cup is , plate is (plate [0,0,1,1]) and fork is (fork [2,2,3,3]) ."
    # the groups are the ones drop_malformed_groups keeps for the masks, whatever the token sequence
    generator = torch.Generator().manual_seed(0)
    words = ["w", "v", *tokens]  # ids 0, 1: text; 2, 3, 4: codebook
    for _ in range(300):
        ids = torch.randint(0, 5, (12,), generator=generator)
        kept, _ = drop_malformed_groups(ids[None], torch.tensor([2, 3, 4]), filler=0)
        kept_at = (kept[0] > 1).nonzero()[:, 0].tolist()  # positions of the kept codebook tokens
        spans = [(kept_at[k], kept_at[k + 2]) for k in range(0, len(kept_at), 3)]  # one per decoded mask
        expected, position = [], 0
        for k, (first, last) in enumerate(spans):
            expected += [words[i] for i in ids[position:first].tolist() if i < 2] + [f"(t{k})"]
            position = last + 1
        expected += [words[i] for i in ids[position:].tolist() if i < 2]
        text = " ".join(words[i] for i in ids.tolist())
        assert rewrite_answer(text, tokens, [f"(t{k})" for k in range(len(spans))]) == " ".join(expected)


def test_target_references_from_meta_or_from_the_masks():
    masks = torch.zeros(2, 5, 6, dtype=torch.long)
    masks[0, 1:3, 2:5] = 1
    meta = {"targets": [{"description": "a red kayak", "bbox": [1.4, 2, 30.6, 40]}, {"description": "oar", "bbox": [0, 0, 1, 1]}]}
    assert target_references(meta, masks) == ["(a red kayak [1,2,31,40])", "(oar [0,0,1,1])"]
    assert target_references({}, masks) == ["(target 0 [2,1,4,2])", "(target 1 [])"]
    assert mask_box(masks[0]) == [2, 1, 4, 2]


def two_question_batch():
    pred = torch.zeros(3, 1, 4, dtype=torch.bool)  # three predictions, the last one matches nothing
    pred[0, 0, :2] = True
    pred[1, 0, 2:] = True
    pred[2, 0, 0] = True
    truth = torch.zeros(2, 1, 4, dtype=torch.long)
    truth[0, 0, 2:] = 1  # matches prediction 1 exactly
    truth[1, 0, :2] = 1  # matches prediction 0 exactly
    return pred, truth


def test_spurious_empty_masks_score_nothing():
    """One target, a wrong mask and 3 empty ones: the empty ones pair with empty ground truth (IoU 1)
    but are unassigned, so they score 0 and gIoU is 0, not 3/4."""
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    truth[0, :2, :2] = 1
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    pred[0, 2:, 2:] = True
    (pairs,) = match_batch([pred], [truth])
    assert pairs.iou().tolist() == [0.0, 1.0, 1.0, 1.0]
    metric = PairedMaskIoU()
    metric.update(pairs.intersection, pairs.union, torch.full((4,), 1), pair_scores(pairs, None))
    assert float(metric.compute()["gIoU"]) == 0.0


def test_judge_weights_matched_pairs_and_zeroes_unmatched():
    pred, truth = two_question_batch()
    (pairs,) = match_batch([pred], [truth])
    answer = "a [SEG0] [SEG1] b [SEG0] [SEG1] c [SEG0] [SEG1]"
    refs = ["(left [0,0,1,0])", "(right [2,0,3,0])"]
    rewritten, verdict = judge_question(FixedJudge(), "q?", answer, pairs, 3, ["(right [2,0,3,0])", "(left [0,0,1,0])"], TOKENS)
    assert rewritten == "a " + refs[0] + " b " + refs[1] + " c (None [])"
    assert verdict.scores == [5, 5, 0]
    scores = pair_scores(pairs, verdict)
    assert pairs.pred_index.tolist() == [0, 1, 2] and scores.tolist() == [0.5, 0.5, 0.0]
    assert pair_scores(pairs, None).tolist() == [1.0, 1.0, 0.0]  # without a judge: unmatched still 0
    record = question_record("q?", answer, pairs, scores, {"json": "x.json", "record_index": 3, "other": 1}, rewritten, verdict)
    assert record["source"] == {"json": "x.json", "record_index": 3}
    assert record["judge_prompt"] == "grade: " + rewritten
    # 2 pairs of IoU ~1 weighted 0.5, 1 unmatched pair (I=0, U=1): gIoU = (0.5 + 0.5 + 0) / 3
    result = scores_of_records([record])
    assert result["gIoU"] == pytest.approx(2 / (2 + 1e-5) * 0.5 * 2 / 3, rel=1e-6)
    assert result["cIoU"] == pytest.approx((0.5 * 2 + 0.5 * 2) / 5, rel=1e-6)


def test_split_json_round_trip_rejudge_and_table(tmp_path):
    pred, truth = two_question_batch()
    (pairs,) = match_batch([pred], [truth])
    answer = "a [SEG0] [SEG1] b [SEG0] [SEG1] c [SEG0] [SEG1]"
    refs = ["(right [2,0,3,0])", "(left [0,0,1,0])"]
    rewritten, verdict = judge_question(IoUOnlyJudge(), "q?", answer, pairs, 3, refs, TOKENS)
    record = question_record("q?", answer, pairs, pair_scores(pairs, verdict), {}, rewritten, verdict)
    split = SplitResult("test", "generate", "IoU-only", scores_of_records([record]), [record])
    path = write_split_json(split, tmp_path)
    assert path.name == "test.json"
    loaded = read_split_json(path)
    assert loaded.records == [record] and loaded.judge == "IoU-only"
    assert math.isnan(loaded.scores["many_gIoU"])
    rejudged = rejudge_split(path, FixedJudge())
    assert rejudged.judge == "fixed"
    assert rejudged.records[0]["judge_scores"] == [5, 5, 0]
    assert rejudged.scores["gIoU"] == pytest.approx(split.scores["gIoU"] / 2, rel=1e-9)
    val = SplitResult("val", "teacher_forced", "none", {"gIoU": 0.5, "cIoU": 0.25, "few_gIoU": 0.6, "few_cIoU": 0.3,
                                                         "many_gIoU": 0.4, "many_cIoU": 0.2})
    table = markdown_table("PixelLM (this run)", [val, split])
    lines = table.splitlines()
    assert lines[0] == (
        "| Method | val few targets gIoU | val few targets cIoU | val many targets gIoU | val many targets cIoU "
        "| val gIoU | val cIoU | test gIoU | test cIoU |"
    )
    assert lines[2].startswith("| PixelLM (this run) | 60.0 | 30.0 | 40.0 | 20.0 | 50.0 | 25.0 | ")
    assert lines[-1] == "gIoU / cIoU in %. Generated answers scored by: IoU-only."
