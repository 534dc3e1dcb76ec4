"""COCO-format annotation files (REFER's instances.json, PACO-LVIS, PASCAL-Part) via pycocotools."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from pixellm.data.errors import DataError
from pixellm.data.loading import is_positive_int, read_json
from pixellm.data.segmentation import decode_segmentation

REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "segmentation"),
}
SIZE_KEYS = ("height", "width")  # of every image: positive integers


def load_coco(path: str | Path, categories: bool = False) -> COCO:
    """Index a COCO-format JSON with pycocotools, after checking the fields the readers use.

    Args:
        path: The JSON file.
        categories: The reader needs the ``categories`` list (and every annotation's
            ``category_id``); without it they are checked only where the file has categories.

    Raises:
        ValueError: On invalid JSON, a missing field or an image size that is not a positive integer,
            naming the file, list, index and field.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO JSON object, got {type(data).__name__}")
    required = dict(REQUIRED_KEYS)
    if categories or "categories" in data:  # pycocotools then indexes every annotation by its category
        required["annotations"] += ("category_id",)
        required["categories"] = ("id", "name")
    for section, keys in required.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: field {section!r}: expected a list")
        for index, entry in enumerate(entries):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise ValueError(f"{path}: {section}[{index}]: field {missing[0]!r}: missing")
            for key in SIZE_KEYS if section == "images" else ():
                if not is_positive_int(entry[key]):
                    raise ValueError(f"{path}: images[{index}]: field {key!r}: expected a positive integer, got {entry[key]!r}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def annotation_mask(annotation: dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    """(H, W) uint8 {0, 1} mask of one annotation: polygons, (un)compressed RLE, or a list of RLEs.

    An empty segmentation gives an empty mask (as the release does).

    Raises:
        DataError: If the segmentation cannot be decoded at (height, width) (names ``where``).
    """
    segmentation = annotation["segmentation"]
    try:
        return decode_segmentation(segmentation, height, width, allow_empty=True)
    except DataError as err:  # skipped and counted by pixellm.reliability.skipping
        raise DataError(f"{where}: field 'segmentation': {err}") from err
