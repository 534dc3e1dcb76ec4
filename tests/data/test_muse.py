"""Tests of the MUSE loader on a hand-made file whose masks are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from coco_fixtures import compressed_rle, uncompressed_rle
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm.data.muse import MuseDataset
from pixellm.data.seg_prompts import LONG_QUESTIONS

H, W = 6, 8


def _known_masks() -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((H, W), np.uint8)
    left[:, :3] = 1
    corner = np.zeros((H, W), np.uint8)
    corner[4:, 5:] = 1
    return left, corner


def _record(**changes: Any) -> dict[str, Any]:
    left, corner = _known_masks()
    box = {
        "id": 1,
        "bbox": [0, 0, 3, 6],
        "category_id": 7,
        "category_name": "box",
        "rephrased_name": "the red box",
        "segmentation": uncompressed_rle(left),
    }
    ball = {
        "id": 2,
        "bbox": [5, 4, 3, 2],
        "category_id": 9,
        "category_name": "ball",
        "rephrased_name": "",
        "segmentation": compressed_rle(corner),
    }
    square = {
        "id": 3,
        "bbox": [1, 1, 4, 4],
        "category_id": 3,
        "category_name": "square",
        "rephrased_name": "the square",
        "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
    }
    record = {
        "file_name": "img.png",
        "height": H,
        "width": W,
        "ann_list": [box, ball, square],
        "questions": ["ball then box?", "box then ball?", "anything purple?", "the square?"],
        "answers": [[ball, box], [box, ball], [], [square]],
        "text_answers": [
            "the ball {seg} and the box {seg}.",
            "only one {seg}.",
            "there is nothing purple.",
            "the square {seg}.",
        ],
    }
    record.update(changes)
    return record


def _write(tmp_path: Path, records: Any) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (10, 20, 30)).save(tmp_path / "images" / "img.png")
    path = tmp_path / "muse.json"
    path.write_text(json.dumps(records))
    return path


def test_masks_follow_text_order_and_fallback_is_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, [_record()])
    with pytest.warns(UserWarning, match="1 of 4 questions"):
        dataset = MuseDataset(path, tmp_path / "images")
    left, corner = _known_masks()
    assert len(dataset) == 4 and dataset.num_fallback_answers == 1
    first = dataset[0]
    assert first.answer == "the ball {seg} and the box {seg}."
    assert first.masks.dtype == torch.uint8
    assert torch.equal(first.masks, torch.from_numpy(np.stack([corner, left])))
    second = dataset[1]  # text_answers has 1 {seg} for 2 targets: rebuilt from the names
    assert second.answer == "the red box {seg} and the ball {seg}."
    assert torch.equal(second.masks, torch.from_numpy(np.stack([left, corner])))
    assert second.meta == {
        "dataset": "muse",
        "json": str(path),
        "record_index": 0,
        "question_index": 1,
        "file_name": "img.png",
        "targets": [  # names and xywh boxes -> xyxy, in text order
            {"description": "the red box", "bbox": [0.0, 0.0, 3.0, 6.0]},
            {"description": "ball", "bbox": [5.0, 4.0, 8.0, 6.0]},
        ],
    }
    assert first.image.size == (W, H) and first.image.mode == "RGB"


def test_zero_targets_and_polygons(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        dataset = MuseDataset(_write(tmp_path, [_record()]), tmp_path / "images")
    empty = dataset[2]
    assert empty.masks.shape == (0, H, W) and empty.answer == "there is nothing purple."
    square = dataset[3].masks[0]
    assert square[2:4, 2:4].all() and square.sum() >= 12 and square[:, 6:].sum() == 0


def test_missing_text_answers_fall_back_for_every_question(tmp_path: Path) -> None:
    record = _record()
    del record["text_answers"]
    with pytest.warns(UserWarning, match="4 of 4 questions"):
        dataset = MuseDataset(_write(tmp_path, [record]), tmp_path / "images")
    assert dataset.text(2) == ("anything purple?", "there is no such object.", 0)
    assert dataset.text(3)[1] == "the square {seg}."


@pytest.mark.parametrize("file_name", ["../img.png", "/etc/passwd", "images/../../img.png"])
def test_paths_may_not_escape_the_root(tmp_path: Path, file_name: str) -> None:
    path = _write(tmp_path, [_record(), _record(file_name=file_name)])
    with pytest.raises(ValueError, match=r"muse.json: record 1: field 'file_name'.*escapes"):
        MuseDataset(path, tmp_path / "images")


def test_coco_url_resolves_by_basename_then_split_folder(tmp_path: Path) -> None:
    record = _record(text_answers=None)
    del record["file_name"]
    record["coco_url"] = "http://images.cocodataset.org/val2017/img.png"
    with pytest.warns(UserWarning):
        dataset = MuseDataset(_write(tmp_path, [record]), tmp_path / "images")
    assert dataset[0].meta["file_name"] == "img.png"
    (tmp_path / "images" / "val2017").mkdir()
    (tmp_path / "images" / "img.png").rename(tmp_path / "images" / "val2017" / "img.png")
    assert dataset[0].meta["file_name"] == "val2017/img.png"


def test_bad_records_name_file_record_and_field(tmp_path: Path) -> None:
    record = _record()
    del record["questions"]
    with pytest.raises(ValueError, match=r"muse.json: record 0: field 'questions': missing"):
        MuseDataset(_write(tmp_path, [record]), tmp_path / "images")
    with pytest.raises(ValueError, match=r"record 0: field 'answers'"):
        MuseDataset(_write(tmp_path, [_record(answers=[[]])]), tmp_path / "images")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        MuseDataset(bad, tmp_path)


def test_image_size_mismatch_is_reported(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        dataset = MuseDataset(_write(tmp_path, [_record(height=7)]), tmp_path / "images")
    with pytest.raises(ValueError, match="record 0: field 'height/width'"):
        dataset[0]


def test_image_roots_as_a_list_or_a_coco_split_mapping(tmp_path: Path) -> None:
    old = _record(file_name="COCO_train2014_000000000001.png")
    new = _record(coco_url="http://images.cocodataset.org/train2017/000000000002.png")
    val = _record(coco_url="http://images.cocodataset.org/val2017/000000000003.png")
    del new["file_name"], val["file_name"]
    path = _write(tmp_path, [old, new, val])
    for folder, name in [("train2014", "COCO_train2014_000000000001.png"), ("train2017", "000000000002.png"),
                         ("val2017", "000000000003.png")]:
        (tmp_path / "coco" / folder).mkdir(parents=True)
        Image.new("RGB", (W, H)).save(tmp_path / "coco" / folder / name)
    roots = {split: str(tmp_path / "coco" / split) for split in ("train2014", "train2017", "val2017")}
    with pytest.warns(UserWarning):
        by_split = MuseDataset(path, roots)
    first_question = [0, 4, 8]  # 4 questions per record
    assert [by_split[i].meta["file_name"] for i in first_question] == [
        "COCO_train2014_000000000001.png", "000000000002.png", "000000000003.png"
    ]
    with pytest.warns(UserWarning):  # a list: each root in turn, coco_url also as split/basename
        listed = MuseDataset(path, [str(tmp_path / "images"), str(tmp_path / "coco" / "train2014"), str(tmp_path / "coco")])
    assert [listed[i].meta["file_name"] for i in first_question] == [
        "COCO_train2014_000000000001.png", "train2017/000000000002.png", "val2017/000000000003.png"
    ]
    with pytest.raises(ValueError, match=r"record 2: field 'coco_url': no image folder for COCO split 'val2017'"):
        MuseDataset(path, {"train2014": roots["train2014"], "train2017": roots["train2017"]})


def test_parts_are_merged_like_pycocotools(tmp_path: Path) -> None:
    left, corner = _known_masks()
    crowd = uncompressed_rle(left)  # crowd annotations are uncompressed RLE
    parts = [compressed_rle(corner), crowd]  # a list of RLE parts
    polygons = [[0, 0, 2, 0, 2, 2, 0, 2], [5, 3, 7, 3, 7, 5], [1, 1, 2, 2]]  # the 2-point one is ignored
    record = _record(
        questions=["crowd?", "parts?", "polygons?"],
        answers=[[{"segmentation": crowd}], [{"segmentation": parts}], [{"segmentation": polygons}]],
        text_answers=["crowd {seg}.", "parts {seg}.", "polygons {seg}."],
    )
    dataset = MuseDataset(_write(tmp_path, [record]), tmp_path / "images")
    expected_polygons = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons[:2], H, W)))
    assert torch.equal(dataset[0].masks[0], torch.from_numpy(left))
    assert torch.equal(dataset[1].masks[0], torch.from_numpy(left | corner))
    assert torch.equal(dataset[2].masks[0], torch.from_numpy(expected_polygons))
    assert expected_polygons[:2, :2].all() and expected_polygons[3:, 5:].any()  # both polygons drawn


@pytest.mark.parametrize("bbox", [[0, 0, None, 6], [0, 0, "wide", 6], [0, 0, float("nan"), 6], [True, 0, 3, 6]])
def test_a_malformed_bbox_gives_the_mask_extent(tmp_path: Path, bbox: list) -> None:
    record = _record()
    record["answers"][0][1]["bbox"] = bbox  # the box, listed second
    with pytest.warns(UserWarning):
        dataset = MuseDataset(_write(tmp_path, [record]), tmp_path / "images")
    assert dataset[0].meta["targets"][1] == {"description": "the red box", "bbox": [0.0, 0.0, 3.0, 6.0]}


def test_release_question_templates_wrap_each_question_anew_each_epoch(tmp_path: Path) -> None:
    path = _write(tmp_path, [_record()])
    with pytest.warns(UserWarning):
        plain = MuseDataset(path, tmp_path / "images")
    with pytest.warns(UserWarning):
        wrapped = MuseDataset(path, tmp_path / "images", question_templates=LONG_QUESTIONS, seed=1)
    assert plain[0].question == "ball then box?"  # the paper's default: as written
    allowed = {t.replace("{sent}", "ball then box?") for t in LONG_QUESTIONS}
    assert wrapped[0].question in allowed and wrapped.text(0)[0] == wrapped[0].question
    assert wrapped[0].answer == plain[0].answer and torch.equal(wrapped[0].masks, plain[0].masks)
    assert wrapped.draw(0, 0).question == wrapped[0].question  # dataset[i] is epoch 0's, fixed
    assert {wrapped.draw(0, epoch).question for epoch in range(12)} == allowed  # drawn anew per epoch
    for bad in ([], ["no placeholder"], ["{sent} and {sent}"]):
        with pytest.raises(ValueError, match="question_templates"):
            MuseDataset(path, tmp_path / "images", question_templates=bad)
