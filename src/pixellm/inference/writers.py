"""Files written per prediction: the answer, one PNG per mask, an overlay and a COCO RLE JSON.

    OUT/<name>/answer.txt     question and the answer with numbered targets
    OUT/<name>/mask_<k>.png   target k as a black/white PNG at the image's size (k from 1)
    OUT/<name>/overlay.png    the image with every mask in its colour, numbered, with a legend
    OUT/<name>/masks.json     the masks as COCO RLE with their scores (pycocotools format)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm.inference.overlay import draw_overlay
from pixellm.inference.predictor import Prediction


def coco_rle(mask: torch.Tensor) -> dict[str, Any]:
    """(H, W) bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def prediction_record(prediction: Prediction) -> dict[str, Any]:
    """The JSON of a prediction: image, question, answers and one COCO annotation per mask."""
    request = prediction.request
    annotations = []
    for k, (mask, score) in enumerate(zip(prediction.masks, prediction.scores, strict=True)):
        rle = coco_rle(mask)
        annotations.append(
            {
                "id": k + 1,
                "label": prediction.labels[k],
                "segmentation": rle,
                "score": round(float(score), 6),
                "area": int(mask_utils.area(_bytes_rle(rle))),
                "bbox": [float(v) for v in mask_utils.toBbox(_bytes_rle(rle))],  # x, y, w, h
            }
        )
    return {
        "image": request.source,
        "height": request.image.height,
        "width": request.image.width,
        "question": request.question,
        "answer": prediction.text,
        "raw_answer": prediction.answer,
        "dropped_codebook_tokens": prediction.dropped_codebook_tokens,
        "annotations": annotations,
    }


def _bytes_rle(rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def write_prediction(prediction: Prediction, folder: Path) -> dict[str, Any]:
    """Write the files of one prediction into ``folder`` (created); returns its JSON record."""
    folder.mkdir(parents=True, exist_ok=True)
    request = prediction.request
    (folder / "answer.txt").write_text(f"Q: {request.question}\nA: {prediction.text}\n")
    for k, mask in enumerate(prediction.masks):
        Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L").save(folder / f"mask_{k + 1}.png")
    draw_overlay(request.image, prediction.masks, prediction.labels).save(folder / "overlay.png")
    record = prediction_record(prediction)
    (folder / "masks.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


class OutputFolders:
    """One fresh output folder per request, under ``root``: its name, else the first free ``_2``, ``_3``...

    A name is never given twice, even where a name looks like a generated one (``x``, ``x``, ``x_2``
    get ``x``, ``x_2``, ``x_2_2``), nor one already on disk: a second run into the same root writes
    beside the first run's folders, never over or among their files. Names stay inside the root:
    leading dots and path separators are dropped (``..`` gives ``image``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.used: set[str] = set()

    def next(self, name: str) -> Path:
        """The folder for ``name`` (an image's stem, or chat's ``<stem>_<turn>``)."""
        base = name.replace("/", "_").replace("\\", "_").strip().lstrip(".") or "image"
        candidate, count = base, 1
        while candidate in self.used or (self.root / candidate).exists():
            count += 1
            candidate = f"{base}_{count}"
        self.used.add(candidate)
        return self.root / candidate
