"""ReasonSeg (LISA's format): one image, one JSON of reasoning queries and polygons.

On disk::

    <root>/<split>/<name>.jpg
    <root>/<split>/<name>.json   {"text": [query, ...], "is_sentence": bool,
                                  "shapes": [{"label": "target"|"ignore"|"flag", "points": [[x, y], ...]}]}

The mask is built as LISA's ``get_mask_from_json``: "flag" shapes are skipped; each polygon's
area is measured by filling it alone; polygons are then drawn in descending area (outline of
width 1 and fill, vertices truncated to int32), "ignore" labels as 255 (left out of the loss and
IoU) and every other label as 1. So a smaller target inside a larger ignore region stays 1.
Every query of an image asks for this one mask (union of its targets), as in LISA and PixelLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pixellm.data.loading import open_image, read_json, seeded_rng
from pixellm.data.muse import target_description
from pixellm.data.sample import Sample
from pixellm.data.seg_prompts import (
    EVAL_QUESTION,
    EVAL_SENTENCE_QUESTION,
    eval_prompt,
    sentence_prompt,
    training_prompt,
)

IGNORE_VALUE = 255
JSON_ENCODINGS = ("utf-8", "cp1252")  # LISA falls back to cp1252 for a few files


def _polygon(shape: Any, where: str) -> tuple[str, np.ndarray]:
    """Lower-cased label and (1, P, 2) int32 vertices of one shape, checked."""
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
        raise ValueError(f"{where}: field 'label': expected a string")
    points = shape.get("points")
    try:
        vertices = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        vertices = np.empty((0,))
    if vertices.ndim != 2 or vertices.shape[0] < 1 or vertices.shape[1] != 2:
        raise ValueError(
            f"{where}: field 'points': expected a list of [x, y] pairs, got {points!r}"
        )
    return shape["label"].lower(), vertices.astype(np.int32)[None]  # truncated as LISA's int32 cast


def _draw(mask: np.ndarray, vertices: np.ndarray, value: int) -> np.ndarray:
    cv2.polylines(mask, vertices, True, value, 1)
    cv2.fillPoly(mask, vertices, value)
    return mask


def reasonseg_mask(shapes: list[Any], height: int, width: int, where: str) -> np.ndarray:
    """(H, W) uint8 mask in {0, 1, 255} from LISA's ``shapes`` (see the module docstring)."""
    polygons = []
    for index, shape in enumerate(shapes):
        label, vertices = _polygon(shape, f"{where}: shapes[{index}]")
        if label == "flag":  # deprecated annotations
            continue
        area = int(_draw(np.zeros((height, width), np.uint8), vertices, 1).sum())
        polygons.append((area, IGNORE_VALUE if "ignore" in label else 1, vertices))
    mask = np.zeros((height, width), np.uint8)
    for position in np.argsort([p[0] for p in polygons])[::-1]:  # largest first, as LISA
        _, value, vertices = polygons[position]
        _draw(mask, vertices, value)
    return mask


class ReasonSegDataset(Dataset[Sample]):
    """ReasonSeg queries with the one mask of their image.

    Training items are every (image, query) pair, with a template drawn from ``(seed, epoch, index)``:
    for ``is_sentence`` images LONG_QUESTIONS ("<query> Please output segmentation mask."),
    otherwise SHORT_QUESTIONS with the lower-cased phrase; answers from ANSWERS. Evaluation items
    are each image's first query with the release's fixed prompt and answer "{seg}.".

    Args:
        root: The ReasonSeg folder (holding ``train/``, ``val/``, ``test/``).
        split: Sub-folder of ``root`` to read.
        train: Every query with random templates (True) or the first query, fixed prompt (False).
        seed: Seed of the template choices.

    Raises:
        ValueError: On a JSON without ``text``/``is_sentence``/``shapes`` or with malformed shapes,
            naming the file and field.
    """

    def __init__(self, root: str, split: str, train: bool = False, seed: int = 0) -> None:
        self.folder = Path(root) / split
        self.train = train
        self.seed = seed
        self.names = sorted(p.name for p in self.folder.glob("*.jpg"))
        if not self.names:
            raise FileNotFoundError(f"{self.folder}: no .jpg images")
        self.records = [
            self._read(self.folder / Path(n).with_suffix(".json").name) for n in self.names
        ]
        self.items = [
            (image, query)
            for image, record in enumerate(self.records)
            for query in range(len(record["text"]) if train else 1)
        ]

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        record = read_json(path, JSON_ENCODINGS)
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected a JSON object")
        text = record.get("text")
        if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
            raise ValueError(f"{path}: field 'text': expected a non-empty list of strings")
        if not isinstance(record.get("is_sentence"), bool):
            raise ValueError(f"{path}: field 'is_sentence': expected true or false")
        if not isinstance(record.get("shapes"), list):
            raise ValueError(f"{path}: field 'shapes': expected a list")
        for index, shape in enumerate(record["shapes"]):
            _polygon(shape, f"{path}: shapes[{index}]")
        return record

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        return self.draw(index, 0)

    def draw(self, index: int, epoch: int) -> Sample:
        """Item ``index`` with the training templates of ``epoch`` (``EpochConcatDataset``), drawn anew
        each epoch as the release draws at every read."""
        image_index, query = self.items[index]
        record, name = self.records[image_index], self.names[image_index]
        json_path = self.folder / Path(name).with_suffix(".json").name
        text = record["text"][query].strip()
        if self.train:
            rng = seeded_rng(self.seed, epoch, index)
            question, answer = (
                sentence_prompt(text, rng)
                if record["is_sentence"]
                else training_prompt([text], rng)
            )
        else:
            template = EVAL_SENTENCE_QUESTION if record["is_sentence"] else EVAL_QUESTION
            question, answer = eval_prompt([text], template)
        image = open_image(self.folder, name, f"{json_path}: image")
        mask = reasonseg_mask(record["shapes"], image.height, image.width, str(json_path))
        meta = {
            "dataset": "reason_seg",
            "json": str(json_path),
            "record_index": image_index,
            "question_index": query,
            "file_name": name,
            "is_sentence": record["is_sentence"],
            "targets": [target_description({"rephrased_name": text}, mask == 1)],
        }
        return Sample(
            image=image,
            question=question,
            answer=answer,
            masks=torch.from_numpy(mask[None]),
            meta=meta,
        )
