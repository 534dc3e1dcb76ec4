"""Helpers of the bad-input catalogue: a small MUSE file whose masks are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

H, W = 6, 8  # every image of these tests


def square_polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """A COCO polygon of the box [x0, x1] x [y0, y1]."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) mask, counts as str (as in JSON)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def annotation(ann_id: int, segmentation: Any, name: str = "the box") -> dict[str, Any]:
    return {"id": ann_id, "rephrased_name": name, "segmentation": segmentation}


def record(file_name: str = "img.png", targets: list[dict] | None = None, **changes: Any) -> dict:
    """One record, one question whose answer has one ``{seg}`` per target."""
    targets = [annotation(1, square_polygon(1, 1, 4, 4))] if targets is None else targets
    base = {
        "file_name": file_name,
        "height": H,
        "width": W,
        "questions": ["where is the box?"],
        "answers": [targets],
        "text_answers": [" and ".join(["it {seg}"] * len(targets)) or "nothing."],
    }
    base.update(changes)
    return base


def write_dataset(folder: Path, records: Any, images: dict[str, Image.Image] | None = None) -> Path:
    """Write ``muse.json`` and the images (default: one 8x6 ``img.png``) under ``folder``."""
    root = folder / "images"
    root.mkdir(parents=True, exist_ok=True)
    for name, image in (images or {"img.png": Image.new("RGB", (W, H), (10, 20, 30))}).items():
        image.save(root / name)
    path = folder / "muse.json"
    path.write_text(json.dumps(records))
    return path
