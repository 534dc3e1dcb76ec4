"""Tests of the ReasonSeg loader on hand-made LISA-format JSONs whose masks are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_fixtures import write_image, write_json

from pixellm.data.reasonseg import ReasonSegDataset
from pixellm.data.seg_prompts import ANSWERS, LONG_QUESTIONS

H, W = 10, 12


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _record_a() -> dict:
    return {
        "text": ["the Mug", "cup"],
        "is_sentence": False,
        "shapes": [  # the target inside the ignore region is listed first: drawing order is by area
            {"label": "target", "points": _square(2, 2, 4, 4)},
            {"label": "target", "points": _square(9.7, 7.9, 11, 9)},  # vertices truncate to int
            {"label": "ignore", "points": _square(0, 0, 7, 6)},
            {"label": "flag", "points": _square(0, 0, 11, 9)},
        ],
    }


def _record_b() -> dict:
    return {
        "text": ["What would you use to cut bread?"],
        "is_sentence": True,
        "shapes": [{"label": "target", "points": [[0, 0], [4, 0], [0, 4]]}],
    }


@pytest.fixture()
def reason_seg(tmp_path: Path) -> Path:
    split = tmp_path / "ReasonSeg" / "val"
    write_image(split / "a.jpg", H, W)
    write_json(split / "a.json", _record_a())
    write_image(split / "b.jpg", 6, 6)
    write_json(split / "b.json", _record_b())
    return tmp_path / "ReasonSeg"


def _expected_a() -> torch.Tensor:
    mask = np.zeros((H, W), np.uint8)
    mask[0:7, 0:8] = 255  # ignore polygon incl. its outline: x 0..7, y 0..6
    mask[2:5, 2:5] = 1  # small target drawn after the larger ignore region
    mask[7:10, 9:12] = 1  # (9.7, 7.9)-(11, 9) truncated to (9, 7)-(11, 9)
    return torch.from_numpy(mask)[None]


def test_polygons_fill_by_descending_area_with_ignore_255(reason_seg: Path) -> None:
    data = ReasonSegDataset(str(reason_seg), "val")
    assert len(data) == 2  # evaluation: the first query of each image
    sample = data[0]
    assert sample.masks.dtype == torch.uint8 and torch.equal(sample.masks, _expected_a())
    assert sample.question == "What is the Mug in this image? Please output segmentation mask."
    assert sample.answer == "{seg}." and sample.image.size == (W, H)
    assert sample.meta["targets"] == [{"description": "the Mug", "bbox": [2.0, 2.0, 12.0, 10.0]}]
    assert sample.meta["file_name"] == "a.jpg" and sample.meta["dataset"] == "reason_seg"
    sentence = data[1]
    assert sentence.question == "What would you use to cut bread? Please output segmentation mask."
    triangle = sentence.masks[0]
    assert triangle.shape == (6, 6) and triangle[0, :5].all() and triangle[:5, 0].all()
    assert triangle.sum() == 15 and triangle[4, 1] == 0 and triangle[2, 2] == 1


def test_training_items_are_every_query_with_seeded_templates(reason_seg: Path) -> None:
    data = ReasonSegDataset(str(reason_seg), "val", train=True, seed=5)
    assert len(data) == 3
    again = ReasonSegDataset(str(reason_seg), "val", train=True, seed=5)
    assert [(data[i].question, data[i].answer) for i in range(3)] == [
        (again[i].question, again[i].answer) for i in range(3)
    ]
    assert "cup" in data[1].question and data[1].answer in ANSWERS
    assert torch.equal(data[1].masks, _expected_a())  # every query asks for the same mask
    sentence = data[2].question
    long_questions = {t.replace("{sent}", "What would you use to cut bread?") for t in LONG_QUESTIONS}
    assert sentence in long_questions
    # drawn anew each epoch (the mixture's EpochConcatDataset reads draw), epoch 0 being dataset[i]
    assert data.draw(2, 0).question == sentence
    drawn = {(data.draw(2, epoch).question, data.draw(2, epoch).answer) for epoch in range(12)}
    assert {q for q, _ in drawn} == long_questions and len(drawn) > 3


def test_cp1252_files_are_read_as_lisa_does(reason_seg: Path) -> None:
    record = _record_b()
    record["text"] = ["Where is the café?"]
    (reason_seg / "val" / "b.json").write_bytes(
        json.dumps(record, ensure_ascii=False).encode("cp1252")
    )
    assert (
        ReasonSegDataset(str(reason_seg), "val")[1].meta["targets"][0]["description"]
        == "Where is the café?"
    )


def test_bad_records_name_file_and_field(reason_seg: Path) -> None:
    record = _record_a()
    record["shapes"][1]["points"] = [[1, 2, 3]]
    write_json(reason_seg / "val" / "a.json", record)
    with pytest.raises(
        ValueError, match=r"a.json: shapes\[1\]: field 'points': expected a list of \[x, y\]"
    ):
        ReasonSegDataset(str(reason_seg), "val")
    record = _record_b()
    del record["is_sentence"]
    write_json(reason_seg / "val" / "a.json", _record_a())
    write_json(reason_seg / "val" / "b.json", record)
    with pytest.raises(ValueError, match=r"b.json: field 'is_sentence'"):
        ReasonSegDataset(str(reason_seg), "val")
    with pytest.raises(FileNotFoundError, match="no .jpg images"):
        ReasonSegDataset(str(reason_seg), "train")


def test_a_reasonseg_batch_keeps_ignore_and_trains(reason_seg: Path, train_step) -> None:
    data = ReasonSegDataset(str(reason_seg), "val", train=True)
    samples = [data[i] for i in range(len(data))]
    assert (samples[0].masks == 255).any()
    train_step(samples)
