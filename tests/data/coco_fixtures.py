"""Tiny COCO-format fixtures in the real on-disk encodings, and pycocotools' own decoding of them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


def box_mask(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    """(H, W) uint8 mask that is 1 on ``[rows, cols]``."""
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (crowd annotations): column-major run lengths starting with 0s."""
    counts, value, run = [], 0, 0
    for v in mask.flatten(order="F"):
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE with an ASCII ``counts`` string, as JSON files store it."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def write_image(
    path: Path, height: int, width: int, colour: tuple[int, int, int] = (90, 60, 30)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def pycocotools_mask(json_path: Path, ann_id: int) -> np.ndarray:
    """What pycocotools itself decodes for annotation ``ann_id`` of a COCO JSON file."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(json_path))
    return coco.annToMask(coco.anns[ann_id])
