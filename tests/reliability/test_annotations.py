"""Bad MUSE annotations: a set-up error naming file, record and field, or a per-item DataError
(which the loaders skip and count), never a wrong mask."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from muse_files import H, W, annotation, compressed_rle, record, square_polygon, write_dataset
from PIL import Image

from pixellm.data.errors import DataError
from pixellm.data.images import EXIF_ORIENTATION_TAG
from pixellm.data.muse import MuseDataset
from pixellm.data.segmentation import decode_segmentation


def _dataset(folder: Path, records: Any, **kwargs: Any) -> MuseDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback-answer summaries
        return MuseDataset(write_dataset(folder, records, **kwargs), folder / "images")


def _item_error(folder: Path, segmentation: Any) -> str:
    dataset = _dataset(folder, [record(targets=[annotation(1, segmentation)])])
    with pytest.raises(DataError) as err:
        dataset[0]
    return str(err.value)


def test_unparseable_json(tmp_path: Path) -> None:
    (tmp_path / "muse.json").write_text('[{"height": 6,')
    with pytest.raises(DataError, match=r"muse\.json: invalid JSON: Expecting"):
        MuseDataset(tmp_path / "muse.json", tmp_path)


def test_json_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "muse.json").write_bytes(b'[{"questions": ["caf\xe9?"]}]')
    with pytest.raises(DataError, match=r"muse\.json: not UTF-8 at byte 20\. re-encode it as UTF-8"):
        MuseDataset(tmp_path / "muse.json", tmp_path)


def test_missing_required_field(tmp_path: Path) -> None:
    bad = record()
    del bad["width"]
    with pytest.raises(DataError, match=r"muse\.json: record 1: field 'width': missing\. fix or remove"):
        _dataset(tmp_path, [record(), bad])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"height": "6"}, "height"),
        ({"width": 0}, "width"),
        ({"height": True}, "height"),
        ({"questions": "where?"}, "questions"),
        ({"answers": {"0": []}}, "answers"),
        ({"answers": [[{"id": 1}]]}, "answers[0]"),
    ],
)
def test_wrong_types(tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(DataError, match=rf"record 0: field '{re.escape(field)}'"):
        _dataset(tmp_path, [record(**changes)])


def test_record_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"muse\.json: record 1: expected an object, got list"):
        _dataset(tmp_path, [record(), [1, 2]])


def test_polygon_with_fewer_than_three_points(tmp_path: Path) -> None:
    message = _item_error(tmp_path, [[1, 1, 4, 4]])
    assert (
        "muse.json: record 0: field 'answers[0][0].segmentation': the segmentation has no area "
        "(no polygon with >= 3 points" in message
    )
    assert "polygon 0 has an odd number (5) of coordinates" in _item_error(tmp_path, [[1, 1, 4, 4, 2]])
    with_a_sliver = decode_segmentation([[1, 1, 4, 4], *square_polygon(1, 1, 4, 4)], H, W)
    assert np.array_equal(with_a_sliver, decode_segmentation(square_polygon(1, 1, 4, 4), H, W))


def test_polygon_out_of_bounds_is_an_error_but_a_pixel_over_is_clipped(tmp_path: Path) -> None:
    message = _item_error(tmp_path, square_polygon(1, 1, 16, 12))
    assert "polygon 0 spans x 1..16, y 1..12, outside the 8x6 image" in message
    assert "drawn on another image size" in message
    clipped = decode_segmentation(square_polygon(-0.5, -0.5, 8.5, 6.5), H, W)
    assert clipped.shape == (H, W) and clipped.all()


def test_polygon_with_non_numbers(tmp_path: Path) -> None:
    assert "polygon 0 is not a list of finite numbers" in _item_error(tmp_path, [[1, 1, "4", 4, 1, 4]])
    assert "polygon 0 is not a list of finite numbers" in _item_error(tmp_path, [[1, 1, 4, float("nan"), 1, 4]])


@pytest.mark.parametrize("segmentation", [[], {"size": [H, W], "counts": [H * W]}])
def test_empty_segmentation(tmp_path: Path, segmentation: Any) -> None:
    message = _item_error(tmp_path, segmentation)
    assert "field 'answers[0][0].segmentation': the segmentation has no area" in message
    assert decode_segmentation(segmentation, H, W, allow_empty=True).tolist() == [[0] * W] * H


@pytest.mark.parametrize(
    ("counts", "problem"),
    [
        ("{{{", "invalid character '{'"),
        ("1a", "end in the middle of a run"),
        ("05", "RLE runs sum to 5 pixels"),
        ([10, -2, 40], "negatives True"),
        ([1.5, 46.5], "must be a string or a list of integers"),
    ],
)
def test_bad_rle_counts(tmp_path: Path, counts: Any, problem: str) -> None:
    assert problem in _item_error(tmp_path, {"size": [H, W], "counts": counts})


def test_rle_size_differs_from_image(tmp_path: Path) -> None:
    mask = np.ones((H + 1, W), np.uint8)
    message = _item_error(tmp_path, compressed_rle(mask))
    assert "RLE size [7, 8] differs from the image's [6, 8]" in message


def test_crowd_rle_decodes_like_a_region(tmp_path: Path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:7] = 1
    flat = mask.flatten(order="F")  # COCO's column-major uncompressed RLE of a crowd
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    crowd = {**annotation(1, {"size": [H, W], "counts": counts}), "iscrowd": 1}
    sample = _dataset(tmp_path, [record(targets=[crowd])])[0]
    assert torch.equal(sample.masks[0], torch.from_numpy(mask))


def test_seg_count_unlike_answer_count_falls_back_to_names(tmp_path: Path) -> None:
    bad = record(targets=[annotation(1, square_polygon(1, 1, 4, 4), "the cat")])
    bad["text_answers"] = ["two {seg} {seg}"]
    path = write_dataset(tmp_path, [bad])
    with pytest.warns(UserWarning, match=r"1 of 1 questions had missing text_answers or a \{seg\} count"):
        dataset = MuseDataset(path, tmp_path / "images")
    assert dataset[0].answer == "the cat {seg}." and dataset[0].masks.shape == (1, H, W)


def test_answer_with_zero_targets_is_a_sample_without_masks(tmp_path: Path) -> None:
    sample = _dataset(tmp_path, [record(targets=[])])[0]
    assert sample.answer == "nothing." and sample.masks.shape == (0, H, W)
    assert sample.meta["targets"] == []


def test_duplicate_annotation_ids_in_one_answer(tmp_path: Path) -> None:
    twice = [annotation(7, square_polygon(1, 1, 4, 4)), annotation(7, square_polygon(1, 1, 4, 4))]
    with pytest.raises(DataError, match=r"record 0: field 'answers\[0\]': annotation ids \[7, 7\] repeat"):
        _dataset(tmp_path, [record(targets=twice)])


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd"])
def test_image_path_escaping_the_root(tmp_path: Path, file_name: str) -> None:
    with pytest.raises(DataError, match=r"muse\.json: record 0: field 'file_name': .* escapes the image root"):
        _dataset(tmp_path, [record(file_name=file_name)])


def test_unreadable_image_names_json_record_and_image(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [record(file_name="gone.png")])
    with pytest.raises(DataError, match=r"muse\.json: record 0: field 'file_name': image not found"):
        dataset[0]
    (tmp_path / "images" / "gone.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"record 0: field 'file_name': .*gone\.png: image file is empty"):
        dataset[0]


def test_exif_rotated_image_must_match_the_annotated_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 8  # displayed rotated: stored W x H shows as H x W
    folder = tmp_path
    write_dataset(folder, [])
    Image.new("RGB", (W, H)).save(folder / "images" / "rot.jpg", exif=exif)
    stored_size = _dataset(folder, [record(file_name="rot.jpg")], images={})
    with pytest.raises(DataError, match=r"field 'height/width': 6x8 but .*rot\.jpg is 8x6 after its EXIF"):
        stored_size[0]
    displayed = record(
        file_name="rot.jpg", height=W, width=H, targets=[annotation(1, square_polygon(1, 1, 4, 4))]
    )
    sample = _dataset(folder, [displayed], images={})[0]
    assert sample.image.size == (H, W) and sample.masks.shape == (1, W, H)
