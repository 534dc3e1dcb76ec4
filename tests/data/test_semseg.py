"""Tests of the semantic/part segmentation loaders on hand-made ADE20K, COCO-Stuff and PACO files."""

from __future__ import annotations

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
from PIL import Image

from pixellm.data.conversation import SEG_PLACEHOLDER
from pixellm.data.semseg import CocoPartSegDataset, LabelMapSegDataset, category_name

H, W = 6, 8


def _label_map() -> np.ndarray:
    label = np.full((H, W), 5, np.uint8)
    label[0] = 0  # ADE20K "other": ignored
    label[1:3] = 1
    label[3:5, :4] = 3
    return label


@pytest.fixture()
def ade(tmp_path: Path) -> Path:
    write_image(tmp_path / "images" / "training" / "ADE_1.jpg", H, W)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(_label_map(), mode="L").save(
        tmp_path / "annotations" / "training" / "ADE_1.png"
    )
    write_json(tmp_path / "ade20k_classes.json", ["wall", "building", "sky", "floor", "tree"])
    return tmp_path


def _ade(root: Path, **kwargs) -> LabelMapSegDataset:
    return LabelMapSegDataset(
        str(root / "images" / "training"),
        str(root / "annotations" / "training"),
        str(root / "ade20k_classes.json"),
        dataset="ade20k",
        label_offset=-1,
        **kwargs,
    )


def _by_name(data, indices) -> dict[str, torch.Tensor]:
    out = {}
    for i in indices:
        sample = data[i]
        assert sample.answer.count(SEG_PLACEHOLDER) == sample.masks.shape[0]
        for target, mask in zip(sample.meta["targets"], sample.masks, strict=True):
            assert target["description"] in sample.question.lower()
            out[target["description"]] = mask
    return out


def test_ade20k_one_mask_per_class_with_zero_ignored(ade: Path) -> None:
    data = _ade(ade)
    assert len(data) == 3  # one image x 3 question slots; 3 classes: one each
    masks = _by_name(data, range(3))
    label = _label_map()
    for name, value in (("wall", 1), ("sky", 3), ("tree", 5)):
        expected = np.where(label == 0, 255, label == value).astype(np.uint8)
        assert masks[name].dtype == torch.uint8 and torch.equal(
            masks[name], torch.from_numpy(expected)
        )
    assert masks["wall"].sum() == 255 * 8 + 16 and (masks["sky"][3:5, :4] == 1).all()
    released = _by_name(_ade(ade, ignore_in_masks=False), range(3))
    assert (released["wall"][0] == 0).all() and released["wall"].sum() == 16
    assert data[0].meta["class_values"] == [1, 3, 5] and data[0].image.size == (W, H)


def test_cocostuff_offset_and_hyphenated_classes(tmp_path: Path) -> None:
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    write_image(tmp_path / "coco" / "000000000009.jpg", 2, 4)
    (tmp_path / "cocostuff").mkdir()
    Image.fromarray(label, mode="L").save(tmp_path / "cocostuff" / "000000000009.png")
    (tmp_path / "classes.txt").write_text("0: unlabeled\n1: person\n2: wall-other\n3: sky\n")
    data = LabelMapSegDataset(
        str(tmp_path / "coco"),
        str(tmp_path / "cocostuff"),
        str(tmp_path / "classes.txt"),
        dataset="cocostuff",
        label_offset=1,
        ignore_names_containing="-",
        max_questions=1,
    )
    sample = data[0]
    masks = _by_name(data, [0])
    assert sorted(masks) == ["person", "sky"] and sample.meta["dataset"] == "cocostuff"
    assert masks["person"].tolist() == [[1, 1, 255, 255], [0, 0, 255, 255]]
    assert masks["sky"].tolist() == [[0, 0, 255, 255], [1, 1, 255, 255]]


def _paco() -> dict:
    leg_a = box_mask(10, 12, slice(0, 3), slice(0, 3))
    return {
        "images": [
            {"id": 1, "file_name": "train2017/000001.jpg", "height": 10, "width": 12},
            {"id": 2, "file_name": "train2017/000002.jpg", "height": 10, "width": 12},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [0, 0, 3, 3],
                "area": 9,
                "segmentation": compressed_rle(leg_a),
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [6, 5, 2, 3],
                "area": 6,
                "segmentation": [[6, 5, 8, 5, 8, 8, 6, 8]],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "bbox": [10, 0, 2, 10],
                "area": 20,
                "segmentation": uncompressed_rle(box_mask(10, 12, slice(None), slice(10, 12))),
            },
            {
                "id": 4,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "bbox": [3, 0, 2, 2],
                "area": 4,
                "segmentation": [[3, 0, 5, 0, 5, 2, 3, 2]],
            },
        ],
        "categories": [
            {"id": 1, "name": "dog:leg"},
            {"id": 2, "name": "trash_can_(bin)"},
            {"id": 3, "name": "dog:head"},
        ],
    }


@pytest.fixture()
def paco(tmp_path: Path) -> Path:
    write_json(tmp_path / "paco_lvis_v1_train.json", _paco())
    write_image(tmp_path / "coco" / "train2017" / "000001.jpg", 10, 12)
    return tmp_path


@pytest.mark.filterwarnings("ignore:.*images without annotations")
def test_paco_category_masks_are_unions_equal_to_pycocotools(paco: Path) -> None:
    json_path = paco / "paco_lvis_v1_train.json"
    with pytest.warns(UserWarning, match="1 images without annotations left out"):
        data = CocoPartSegDataset(str(json_path), str(paco / "coco"), max_questions=1, seed=2)
    sample = data[0]
    assert len(data) == 1 and sample.masks.shape == (3, 10, 12)
    names = [t["description"] for t in sample.meta["targets"]]
    leg = next(n for n in names if "leg" in n)
    assert leg in ("dog leg", "the leg of the dog") and "trash can" in names
    masks = dict(zip(names, sample.masks, strict=True))
    union = pycocotools_mask(json_path, 1) | pycocotools_mask(json_path, 2)
    assert torch.equal(masks[leg], torch.from_numpy(union)) and masks[leg].sum() == 9 + 6
    assert torch.equal(
        masks["trash can"], torch.from_numpy(pycocotools_mask(json_path, 3))
    )  # crowd RLE
    assert masks["trash can"].sum() == 20 and sample.meta["file_name"] == "train2017/000001.jpg"
    names_by_seed = {
        next(
            t["description"]
            for t in CocoPartSegDataset(
                str(json_path), str(paco / "coco"), max_questions=1, seed=s
            )[0].meta["targets"]
            if "head" in t["description"]
        )
        for s in range(8)
    }
    assert names_by_seed == {"dog head", "the head of the dog"}


def test_category_names_and_bad_records(paco: Path) -> None:
    assert category_name("trash_can_(bin)") == "trash can" and category_name("cat:ear") == (
        "cat",
        "ear",
    )
    broken = _paco()
    broken["annotations"][3]["category_id"] = 9
    write_json(paco / "bad.json", broken)
    with pytest.raises(ValueError, match=r"bad.json: annotation 4: field 'category_id': 9"):
        CocoPartSegDataset(str(paco / "bad.json"), str(paco / "coco"))
    broken = _paco()
    del broken["categories"]  # the part reader names its classes from them
    write_json(paco / "bad.json", broken)
    with pytest.raises(ValueError, match=r"bad.json: field 'categories': expected a list"):
        CocoPartSegDataset(str(paco / "bad.json"), str(paco / "coco"))
    broken = _paco()
    broken["images"][0]["width"] = 13
    write_json(paco / "bad.json", broken)
    with pytest.warns(UserWarning):
        data = CocoPartSegDataset(str(paco / "bad.json"), str(paco / "coco"))
    with pytest.raises(
        ValueError, match=r"bad.json: image 1: field 'file_name': annotations are 10x13"
    ):
        data[0]


@pytest.mark.parametrize("size", ["10", 10.0, 0, True])
def test_image_sizes_that_are_not_positive_integers_are_refused(paco: Path, size) -> None:
    broken = _paco()
    broken["images"][0]["height"] = size
    write_json(paco / "bad.json", broken)
    with pytest.raises(ValueError, match=r"bad.json: images\[0\]: field 'height': expected a positive integer"):
        CocoPartSegDataset(str(paco / "bad.json"), str(paco / "coco"))


def test_an_image_without_classes_does_not_copy_the_next_images_items(ade: Path) -> None:
    write_image(ade / "images" / "training" / "ADE_0.jpg", H, W)  # sorted first, all "other"
    Image.fromarray(np.zeros((H, W), np.uint8), mode="L").save(ade / "annotations" / "training" / "ADE_0.png")
    data = _ade(ade, max_targets=1)
    with pytest.warns(UserWarning, match="no labelled class; the next image is used"):
        substitutes = [data[i] for i in range(3)]
    own = [data[i] for i in range(3, 6)]
    assert all(s.meta["file_name"] == o.meta["file_name"] for s, o in zip(substitutes, own, strict=True))

    def key(sample):
        return sample.question, sample.answer, sample.masks.sum().item()

    assert [key(s) for s in substitutes] != [key(o) for o in own]
    assert len({key(s) for s in substitutes}) == 3  # still one class per slot, the 3 classes dealt anew


def test_rgb_label_maps_are_refused(ade: Path) -> None:
    Image.new("RGB", (W, H)).save(ade / "annotations" / "training" / "ADE_1.png")
    with pytest.raises(ValueError, match="ADE_1.png: expected a single-channel label map"):
        _ade(ade)[0]


def test_a_semseg_batch_trains_the_tiny_model(ade: Path, paco: Path, train_step) -> None:
    with pytest.warns(UserWarning):
        parts = CocoPartSegDataset(str(paco / "paco_lvis_v1_train.json"), str(paco / "coco"))
    ade_data = _ade(ade)
    train_step([ade_data[0], ade_data[1], parts[0], parts[1]])
