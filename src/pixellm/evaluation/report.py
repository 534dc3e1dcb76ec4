"""Evaluation outputs: one results JSON per split, and a Markdown table shaped like Tables 1-3.

Table columns, per split in dataloader order: "<split> gIoU", "<split> cIoU", preceded by the
few-target (<= 3) and many-target (> 3) scores when the split holds questions of both kinds (as
Table 1's "few targets" / "many targets" / "overall"). Scores are in percent, one decimal, as the
paper prints them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixellm.evaluation.judge import AnswerJudge
from pixellm.evaluation.matching import concatenate
from pixellm.evaluation.muse_protocol import pairs_of_record, rejudge_record
from pixellm.metrics.iou import PairedMaskIoU


@dataclass
class SplitResult:
    """The scores of one evaluation split and the records behind them.

    Attributes:
        name: the split's name ("val", "test_less", ...).
        mode: "teacher_forced" or "generate".
        judge: label of the judge that weighted the pairs ("IoU-only", "judge gpt-3.5-turbo", or
            "none" for teacher-forced splits).
        scores: ``PairedMaskIoU.compute()`` as floats.
        records: one JSON record per question (``muse_protocol.question_record``).
    """

    name: str
    mode: str
    judge: str
    scores: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON document written for this split."""
        return {
            "split": self.name,
            "mode": self.mode,
            "judge": self.judge,
            "num_questions": len(self.records),
            "scores": {k: None if math.isnan(v) else v for k, v in self.scores.items()},
            "questions": self.records,
        }


def write_split_json(result: SplitResult, folder: str | Path) -> Path:
    """Write ``<folder>/<split>.json``; return its path."""
    path = Path(folder) / f"{result.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path


def read_split_json(path: str | Path) -> SplitResult:
    """A split written by ``write_split_json``."""
    data = json.loads(Path(path).read_text())
    scores = {k: math.nan if v is None else v for k, v in data["scores"].items()}
    return SplitResult(data["split"], data["mode"], data["judge"], scores, data["questions"])


def scores_of_records(records: list[dict[str, Any]]) -> dict[str, float]:
    """gIoU / cIoU (overall, few, many) recomputed from the pairs and scores saved in records."""
    metric = PairedMaskIoU()
    for record in records:
        inter, union, counts = concatenate([pairs_of_record(record)])
        metric.update(inter, union, counts, torch.tensor([p["score"] for p in record["pairs"]]))
    return {k: float(v) for k, v in metric.compute().items()}


def rejudge_split(path: str | Path, judge: AnswerJudge) -> SplitResult:
    """Judge a saved generate-mode split again (no generation) and recompute its scores."""
    result = read_split_json(path)
    if result.mode != "generate":
        raise ValueError(f"{path}: split {result.name!r} was evaluated {result.mode}, there is nothing to judge")
    records = [rejudge_record(r, judge) for r in result.records]
    return SplitResult(result.name, result.mode, judge.label, scores_of_records(records), records)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(run_name: str, results: list[SplitResult]) -> str:
    """A one-row Markdown table of the splits' scores (module docstring), with a caption."""
    header, row = ["Method"], [run_name]
    for result in results:
        groups = [""]
        if not (math.isnan(result.scores["few_gIoU"]) or math.isnan(result.scores["many_gIoU"])):
            groups = ["few_", "many_", ""]
        for group in groups:
            label = {"few_": "few targets ", "many_": "many targets ", "": ""}[group]
            for metric in ("gIoU", "cIoU"):
                header.append(f"{result.name} {label}{metric}")
                row.append(_percent(result.scores[f"{group}{metric}"]))
    judged = sorted({r.judge for r in results if r.mode == "generate"})
    caption = "gIoU / cIoU in %. " + (
        f"Generated answers scored by: {', '.join(judged)}." if judged else "Teacher-forced masks (text order)."
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    return "\n".join([*lines, "", caption])
