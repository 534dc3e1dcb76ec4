"""Tests of the REFER-layout loaders on a hand-made refcoco whose masks are known."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_fixtures import (
    box_mask,
    compressed_rle,
    pycocotools_mask,
    uncompressed_rle,
    write_image,
    write_json,
)

from pixellm.data.conversation import SEG_PLACEHOLDER
from pixellm.data.refer import MultiReferDataset, ReferDataset, convert_refs_command
from pixellm.data.refs_file import load_refs
from pixellm.data.seg_prompts import ANSWERS, SHORT_QUESTIONS

H, W = 10, 12


def _instances() -> dict:
    images = [
        {"id": 1, "file_name": "COCO_train2014_1.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "COCO_train2014_2.jpg", "height": 8, "width": 8},
    ]
    annotations = [  # a polygon, a compressed RLE, a crowd (uncompressed RLE), a triangle
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [1, 1, 4, 3],
            "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]],
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [0, 6, 4, 3],
            "segmentation": compressed_rle(box_mask(H, W, slice(6, 9), slice(0, 4))),
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 1,
            "bbox": [8, 0, 4, 10],
            "segmentation": uncompressed_rle(box_mask(H, W, slice(None), slice(8, 12))),
        },
        {
            "id": 21,
            "image_id": 2,
            "category_id": 2,
            "iscrowd": 0,
            "bbox": [0, 0, 6, 6],
            "segmentation": [[0, 0, 6, 0, 0, 6]],
        },
    ]
    categories = [{"id": 1, "name": "box"}, {"id": 2, "name": "person"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _ref(ref_id: int, image_id: int, ann_id: int, split: str, sentences: list[str]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "sent_ids": list(range(len(sentences))),
        "sentences": [
            {"sent": s, "raw": s, "tokens": s.split(), "sent_id": i}
            for i, s in enumerate(sentences)
        ],
    }


def _refs() -> list[dict]:
    return [
        _ref(100, 1, 11, "train", ["Left Box ", "the box on the left"]),
        _ref(101, 1, 12, "train", ["bottom strip"]),
        _ref(102, 1, 13, "train", ["crowd on the right"]),
        _ref(103, 2, 21, "val", ["triangle"]),
        _ref(104, 1, 12, "val", [f"strip {i}" for i in range(9)]),
        _ref(105, 1, 13, "val", [f"crowd {i}" for i in range(8)]),
    ]


@pytest.fixture()
def refcoco(tmp_path: Path) -> Path:
    write_json(tmp_path / "refer" / "refcoco" / "instances.json", _instances())
    (tmp_path / "refer" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(_refs(), protocol=2))
    write_image(tmp_path / "images" / "COCO_train2014_1.jpg", H, W)
    write_image(tmp_path / "images" / "COCO_train2014_2.jpg", 8, 8)
    return tmp_path


def _dataset(cls, root: Path, split: str, **kwargs):
    return cls(str(root / "refer"), "refcoco", split, str(root / "images"), **kwargs)


def _expected(root: Path, *ann_ids: int) -> torch.Tensor:
    path = root / "refer" / "refcoco" / "instances.json"
    return torch.from_numpy(np.stack([pycocotools_mask(path, a) for a in ann_ids]))


def test_single_referring_masks_equal_pycocotools(refcoco: Path) -> None:
    data = _dataset(ReferDataset, refcoco, "train")
    assert len(data) == 4  # every sentence of the split
    first = data[0]
    assert first.question == "What is left box in this image? Please output segmentation mask."
    assert first.answer == "{seg}." and first.image.size == (W, H)
    assert first.masks.dtype == torch.uint8 and first.masks.shape == (1, H, W)
    assert torch.equal(first.masks, _expected(refcoco, 11))
    assert (
        first.masks[0, 1:4, 1:5].all() and first.masks.sum() == 12
    )  # polygon: x in [1,5), y in [1,4)
    assert first.meta["targets"] == [{"description": "left box", "bbox": [1.0, 1.0, 5.0, 4.0]}]
    assert first.meta["dataset"] == "refcoco" and first.meta["ref_ids"] == [100]
    assert torch.equal(data[2].masks, _expected(refcoco, 12)) and data[2].masks.sum() == 12
    crowd = data[3].masks  # uncompressed RLE of the crowd annotation
    assert (
        torch.equal(crowd, _expected(refcoco, 13)) and crowd.sum() == 40 and crowd[0, :, 8:].all()
    )


def test_training_templates_are_seeded_per_item(refcoco: Path) -> None:
    one = _dataset(ReferDataset, refcoco, "train", train=True, seed=3)
    again = _dataset(ReferDataset, refcoco, "train", train=True, seed=3)
    assert [(one[i].question, one[i].answer) for i in range(4)] == [
        (again[i].question, again[i].answer) for i in range(4)
    ]
    questions = {
        _dataset(ReferDataset, refcoco, "train", train=True, seed=s)[1].question for s in range(12)
    }
    allowed = {t.replace("{class_name}", "the box on the left") for t in SHORT_QUESTIONS}
    assert questions <= allowed and len(questions) > 1
    assert one[0].answer in ANSWERS
    # drawn anew each epoch (the mixture's EpochConcatDataset reads draw), epoch 0 being dataset[i]
    assert (one.draw(1, 0).question, one.draw(1, 0).answer) == (one[1].question, one[1].answer)
    assert len({(one.draw(1, epoch).question, one.draw(1, epoch).answer) for epoch in range(10)}) > 3
    assert {one.draw(1, epoch).question for epoch in range(10)} <= allowed


def test_multi_referring_evaluation_cycles_six_five_four(refcoco: Path) -> None:
    data = _dataset(MultiReferDataset, refcoco, "val")
    sizes = [data[i].masks.shape[0] for i in range(len(data))]
    assert sizes == [1, 6, 5, 4, 2]  # image 2 (1 sentence), then image 1's 17 sentences
    second = data[2]  # sentences 6..10: strip 6-8 (ann 12) then crowd 0-1 (ann 13)
    assert second.question == "Please segment the strip 6, strip 7, strip 8, crowd 0 and crowd 1."
    assert second.answer == "{seg}, {seg}, {seg}, {seg} and {seg}."
    assert torch.equal(second.masks, _expected(refcoco, 12, 12, 12, 13, 13))
    assert [t["description"] for t in second.meta["targets"]] == [
        "strip 6",
        "strip 7",
        "strip 8",
        "crowd 0",
        "crowd 1",
    ]
    release = _dataset(MultiReferDataset, refcoco, "val", eval_prompt="release")
    assert release[0].question == "What is triangle in this image? Please output segmentation mask."
    assert release[0].answer == "{seg}." and torch.equal(release[0].masks, _expected(refcoco, 21))


def test_multi_referring_training_deals_disjoint_questions(refcoco: Path) -> None:
    data = _dataset(MultiReferDataset, refcoco, "train", train=True, seed=1)
    assert len(data) == 3  # image 1 has 4 sentences: 3 questions
    names = [[t["description"] for t in data[i].meta["targets"]] for i in range(3)]
    assert sorted(sum(names, [])) == [
        "bottom strip",
        "crowd on the right",
        "left box",
        "the box on the left",
    ]
    ann_of = {
        "left box": 11,
        "the box on the left": 11,
        "bottom strip": 12,
        "crowd on the right": 13,
    }
    for i, group in enumerate(names):
        sample = data[i]
        assert 1 <= len(group) <= 3 and sample.answer.count(SEG_PLACEHOLDER) == len(group)
        assert torch.equal(sample.masks, _expected(refcoco, *(ann_of[n] for n in group)))
    many = _dataset(MultiReferDataset, refcoco, "val", train=True, seed=1)
    assert [many[i].masks.shape[0] for i in range(len(many))] == [1, 3, 3, 3]  # 9 of 17 drawn
    drawn = [t["description"] for i in (1, 2, 3) for t in many[i].meta["targets"]]
    assert len(set(drawn)) == 9
    again = _dataset(MultiReferDataset, refcoco, "val", train=True, seed=1)
    assert [again[i].question for i in range(4)] == [many[i].question for i in range(4)]
    # each epoch deals anew (disjoint within it), so the image's other 8 sentences get asked too
    seen = set()
    for epoch in range(12):
        drawn = [t["description"] for i in (1, 2, 3) for t in many.draw(i, epoch).meta["targets"]]
        assert len(set(drawn)) == 9
        seen |= set(drawn)
    assert len(seen) == 17
    assert [many.draw(i, 0).question for i in range(4)] == [many[i].question for i in range(4)]


def test_a_malicious_refs_pickle_is_refused(refcoco: Path) -> None:
    marker = refcoco / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = refcoco / "refer" / "refcoco" / "refs(unc).p"
    path.write_bytes(pickle.dumps([Exploit()]))
    with pytest.raises(
        ValueError,
        match=r"refs\(unc\).p: not a plain-data pickle: refused to load the global (posix|os)\.system",
    ):
        _dataset(ReferDataset, refcoco, "train")
    assert not marker.exists()


def test_converted_json_is_preferred_and_equal(
    refcoco: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = refcoco / "refer" / "refcoco"
    convert_refs_command([str(folder / "refs(unc).p"), str(folder / "refs(unc).json")])
    assert "wrote 6 refs" in capsys.readouterr().out
    assert load_refs(folder / "refs(unc).json") == load_refs(folder / "refs(unc).p")
    (folder / "refs(unc).p").unlink()
    data = _dataset(ReferDataset, refcoco, "train")
    assert data.refs_file.name == "refs(unc).json" and torch.equal(
        data[3].masks, _expected(refcoco, 13)
    )


def test_bad_records_name_file_index_and_field(refcoco: Path) -> None:
    folder = refcoco / "refer" / "refcoco"
    refs = _refs()
    del refs[1]["sentences"]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match=r"refs\(unc\).p: ref 1: field 'sentences': missing"):
        _dataset(ReferDataset, refcoco, "train")
    refs = _refs()
    refs[0]["ann_id"] = 99
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match=r"ref 0: field 'ann_id': 99 is not in .*instances.json"):
        _dataset(ReferDataset, refcoco, "train")
    instances = _instances()
    del instances["images"][1]["height"]
    write_json(folder / "instances.json", instances)
    with pytest.raises(ValueError, match=r"instances.json: images\[1\]: field 'height': missing"):
        _dataset(ReferDataset, refcoco, "train")
    instances = _instances()  # with 'categories', pycocotools reads every annotation's category
    del instances["annotations"][2]["category_id"]
    write_json(folder / "instances.json", instances)
    with pytest.raises(ValueError, match=r"instances.json: annotations\[2\]: field 'category_id': missing"):
        _dataset(ReferDataset, refcoco, "train")
    del instances["categories"]  # without them, the referring reader needs no category at all
    write_json(folder / "instances.json", instances)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(_refs()))
    assert len(_dataset(ReferDataset, refcoco, "train")) > 0


def test_image_problems_are_reported_with_the_record(refcoco: Path) -> None:
    folder = refcoco / "refer" / "refcoco"
    instances = _instances()
    instances["images"][0]["height"] = 11
    write_json(folder / "instances.json", instances)
    with pytest.raises(
        ValueError, match=r"image 1: field 'file_name': annotations are 11x12 .* is 10x12"
    ):
        _dataset(ReferDataset, refcoco, "train")[0]
    instances["images"][0].update(height=H, file_name="../COCO_train2014_1.jpg")
    write_json(folder / "instances.json", instances)
    with pytest.raises(ValueError, match="escapes the image root"):
        _dataset(ReferDataset, refcoco, "train")[0]


def test_a_refer_batch_trains_the_tiny_model(refcoco: Path, train_step) -> None:
    single = _dataset(ReferDataset, refcoco, "train", train=True)
    multi = _dataset(MultiReferDataset, refcoco, "val", train=True)
    train_step([single[0], single[3], multi[1], multi[2]])
