"""Tests of the shapes generator: determinism, atomic writes, masks, and question quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pixellm.data import shapes
from pixellm.data.muse import decode_segmentation
from pixellm.data.shapes_questions import VisibleShape, make_questions, shares_colour, split_words

NUM_TRAIN, NUM_VAL = 40, 8


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "seed0"
    shapes.generate_shapes_dataset(out, seed=0, num_train_images=NUM_TRAIN, num_val_images=NUM_VAL)
    return out


@pytest.fixture(scope="module")
def records(dataset: Path) -> list[dict]:
    return json.loads((dataset / "muse_train.json").read_text()) + json.loads(
        (dataset / "muse_val.json").read_text()
    )


def test_layout_on_disk(dataset: Path) -> None:
    assert len(list((dataset / "images" / "train").glob("*.png"))) == NUM_TRAIN
    assert (dataset / "images" / "val" / "000007.png").is_file()
    assert not [p for p in dataset.parent.iterdir() if ".tmp-" in p.name]


def test_same_seed_same_bytes_other_seed_other_bytes(dataset: Path, tmp_path: Path) -> None:
    shapes.generate_shapes_dataset(tmp_path / "again", 0, NUM_TRAIN, NUM_VAL)
    shapes.generate_shapes_dataset(tmp_path / "other", 1, NUM_TRAIN, NUM_VAL)
    assert _files(tmp_path / "again") == _files(dataset)
    other = _files(tmp_path / "other")
    assert other["muse_train.json"] != _files(dataset)["muse_train.json"]
    assert other["images/train/000000.png"] != _files(dataset)["images/train/000000.png"]


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = shapes.make_record
    monkeypatch.setattr(shapes, "make_record", failing)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate_shapes_dataset(tmp_path / "ds", 0, 5, 1)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_not_overwritten(dataset: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        shapes.generate_shapes_dataset(dataset, 0, 1, 1)


def test_ensure_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = shapes.ensure_shapes_dataset(tmp_path, seed=3, num_train_images=2, num_val_images=1)
    assert path == tmp_path / "shapes-v1-seed3-2-1-64"
    monkeypatch.setattr(
        shapes, "generate_shapes_dataset", lambda *a, **k: pytest.fail("regenerated")
    )
    assert shapes.ensure_shapes_dataset(tmp_path, 3, 2, 1) == path


def test_segmentations_round_trip_both_encodings() -> None:
    kinds_seen = set()
    for seed in range(30):
        specs, visible = shapes._place(np.random.default_rng(seed), 64)
        for spec, mask in zip(specs, visible, strict=True):
            occluded = bool(mask.sum() < shapes.rasterise(spec, 64).sum())
            seg = shapes._segmentation(spec, mask, occluded)
            decoded = decode_segmentation(json.loads(json.dumps(seg)), 64, 64).astype(bool)
            if isinstance(seg, list):
                kinds_seen.add("polygon")
                iou = (decoded & mask).sum() / (decoded | mask).sum()
                assert iou > 0.95
            else:
                kinds_seen.add("rle")
                assert np.array_equal(decoded, mask)
            assert mask.sum() >= shapes.MIN_VISIBLE_PIXELS
    assert kinds_seen == {"polygon", "rle"}


def test_masks_are_disjoint_and_match_image_colours(dataset: Path, records: list[dict]) -> None:
    from PIL import Image

    for record in records[:20]:
        image = np.asarray(Image.open(dataset / "images" / record["file_name"])).astype(float)
        masks = [
            decode_segmentation(a["segmentation"], 64, 64).astype(bool) for a in record["ann_list"]
        ]
        assert int(np.sum(masks, axis=0).max()) == 1  # visible parts never overlap
        for ann, mask in zip(record["ann_list"], masks, strict=True):
            colour = ann["rephrased_name"].split()[2]
            mean = image[mask].mean(axis=0)
            assert np.abs(mean - shapes.COLOUR_RGB[colour]).max() < 4, (
                record["file_name"],
                ann["rephrased_name"],
            )


def test_answers_match_placeholders_and_text_order(records: list[dict]) -> None:
    for record in records:
        assert 2 <= len(record["questions"]) <= 3
        for answer, text in zip(record["answers"], record["text_answers"], strict=True):
            assert text.count("{seg}") == len(answer) <= 5
            assert all(a in record["ann_list"] for a in answer)
            names = [a["rephrased_name"] for a in answer]
            pieces = text.split(" {seg}")[:-1]
            assert [p.removeprefix(", ").removeprefix(" and ") for p in pieces] == names
            centroids = [
                decode_segmentation(a["segmentation"], 64, 64).nonzero()[1].mean() for a in answer
            ]
            assert centroids == sorted(centroids)


def test_question_mix(records: list[dict]) -> None:
    vocabulary = set(shapes.shapes_corpus())
    pairs = [(r, q) for r in records for q in range(len(r["questions"]))]
    none = [(r, q) for r, q in pairs if not r["answers"][q]]
    assert 0.03 < len(none) / len(pairs) < 0.25
    assert all(r["text_answers"][q].startswith("there is no") for r, q in none)
    shared = 0
    for r, q in pairs:
        assert set(split_words(r["questions"][q] + " " + r["text_answers"][q])) <= vocabulary
        colours = [a["rephrased_name"].split()[2] for a in r["ann_list"]]
        ids = {a["id"] for a in r["answers"][q]}
        others = {c for a, c in zip(r["ann_list"], colours, strict=True) if a["id"] not in ids}
        shared += any(a["rephrased_name"].split()[2] in others for a in r["answers"][q])
    assert shared / len(pairs) > 0.3


def _shape(kind: str, colour: str, size: str, x: float, y: float) -> VisibleShape:
    return VisibleShape(kind, colour, size, 90 if size == "small" else 340, (x, y))


def test_questions_are_unambiguous() -> None:
    scene = [
        _shape("circle", "red", "small", 10, 10),
        _shape("circle", "red", "large", 30, 12),
        _shape("square", "red", "large", 31, 40),
        _shape("triangle", "blue", "small", 50, 50),
    ]
    asked = {}
    for seed in range(200):
        for qa in make_questions(scene, 64, 3, np.random.default_rng(seed)):
            asked[qa.question] = qa
    assert asked["segment the small circle."].targets == (0,)
    assert (
        asked["which of these could roll?"].answer
        == "the small red circle {seg} and the large red circle {seg}."
    )
    assert asked["segment the leftmost shape."].targets == (0,)
    assert asked["which shapes have four corners?"].targets == (2,)
    assert "segment the red circle." not in asked  # two red circles
    assert "segment the rightmost red shape." not in asked  # x 30 vs 31: a tie
    assert "segment the largest shape." not in asked  # two large shapes tie
    assert shares_colour(scene, (0,)) and not shares_colour(scene, (3,))
