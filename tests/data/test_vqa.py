"""Tests of the LLaVA-Instruct VQA loader: turns, image marker, history, K = 0 masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from coco_fixtures import write_image, write_json

from pixellm.data.errors import DataError
from pixellm.data.vqa import VQADataset


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def _records() -> list[dict]:
    return [
        {
            "id": "000000000001",
            "image": "000000000001.jpg",
            "conversations": [
                _turn("human", "<image>\nWhat colour is the bus?"),
                _turn("gpt", "The bus is red."),
                _turn("human", "Where is it going?"),
                _turn("gpt", "It drives to the station."),
            ],
        },
        {
            "id": "000000000002",
            "image": "000000000002.jpg",
            "conversations": [
                _turn("human", "Describe the scene.\n<image>"),
                _turn("gpt", "A dog sleeps on a sofa."),
            ],
        },
        {
            "id": "000000000003",
            "image": "000000000002.jpg",
            "conversations": [
                _turn("human", "<image>\nWhat is shown?"),
                _turn("gpt", "A template {seg} string."),
            ],
        },
    ]


@pytest.fixture()
def llava(tmp_path: Path) -> Path:
    write_image(tmp_path / "train2017" / "000000000001.jpg", 5, 7)
    write_image(tmp_path / "train2017" / "000000000002.jpg", 4, 4)
    return write_json(tmp_path / "llava_instruct_150k.json", _records())


def _dataset(path: Path) -> VQADataset:
    return VQADataset(str(path), str(path.parent / "train2017"))


def test_last_exchange_is_the_question_and_earlier_ones_the_history(llava: Path) -> None:
    with pytest.warns(UserWarning, match=r"1 of 3 records hold the literal \{seg\}"):
        data = _dataset(llava)
    assert len(data) == 2 and data.num_skipped == 1
    first = data[0]
    assert (first.question, first.answer) == ("Where is it going?", "It drives to the station.")
    assert first.history == [("What colour is the bus?", "The bus is red.")]
    assert first.masks.shape == (0, 5, 7) and first.masks.dtype == torch.uint8
    assert first.image.size == (7, 5) and first.meta["targets"] == []
    assert first.meta["id"] == "000000000001" and first.meta["dataset"] == "llava_instruct_150k"
    second = data[1]
    assert second.question == "Describe the scene." and second.history == []
    assert second.meta["record_index"] == 1 and second.meta["question_index"] == 0


def test_bad_records_name_file_record_and_field(llava: Path) -> None:
    records = _records()
    records[1]["conversations"][1]["from"] = "human"
    write_json(llava, records)
    with pytest.raises(
        ValueError,
        match=r"llava_instruct_150k.json: record 1: field 'conversations\[1\]'.from: expected 'gpt', got 'human'",
    ):
        _dataset(llava)
    records = _records()
    del records[0]["image"]
    write_json(llava, records)
    with pytest.raises(ValueError, match=r"record 0: field 'image': expected a string"):
        _dataset(llava)
    records = _records()
    records[1]["conversations"].pop()
    write_json(llava, records)
    with pytest.raises(
        ValueError, match=r"record 1: field 'conversations': expected a non-empty list"
    ):
        _dataset(llava)
    records = _records()[:2]
    records[1]["image"] = "../../etc/passwd"
    write_json(llava, records)
    with pytest.raises(ValueError, match=r"record 1: field 'image': .*escapes the image root"):
        _dataset(llava)[1]


@pytest.mark.filterwarnings("ignore:.*literal")
def test_a_batch_without_any_mask_trains_the_tiny_model(llava: Path, train_step) -> None:
    data = _dataset(llava)
    samples = [data[0], data[1], data[1]]
    assert sum(s.masks.shape[0] for s in samples) == 0
    train_step(samples)  # the loss keeps a graph with no mask in the batch (CE only)


def test_a_missing_or_broken_image_is_a_skippable_data_error(llava: Path) -> None:
    dataset = _dataset(llava)
    (llava.parent / "train2017" / "000000000001.jpg").unlink()
    (llava.parent / "train2017" / "000000000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"000000000001\.jpg: image not found"):
        dataset[0]
    with pytest.raises(DataError, match=r"000000000002\.jpg: not a readable image"):
        dataset[1]
