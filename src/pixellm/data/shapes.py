"""The embedded "shapes" dataset: small generated images written in MUSE's JSON format.

Each image shows 1-5 flat shapes (circle, square, triangle, diamond) in 5 colours and 2 clearly
different sizes on a light, slightly noisy background. Layouts repeat colours and kinds on
purpose, so that colour alone rarely identifies a target and questions need shape, size and
position words (see ``shapes_questions``). Shapes are drawn in order; an occluded shape's mask is
its visible part. A shape's position is redrawn while it would leave an earlier shape < 50 % of
its area or < 20 visible pixels, or touch an earlier shape of its colour (the two would read as
one blob); after 20 tries the shape is left out. Areas scale with the image size.

Segmentations are COCO polygons for unoccluded polygonal shapes and compressed RLE for circles and
occluded shapes; polygon masks are rasterised by pycocotools itself, so decoding reproduces them.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm.data.conversation import template_words
from pixellm.data.shapes_questions import (
    COLOURS,
    KINDS,
    SIZES,
    VisibleShape,
    make_questions,
    question_corpus,
    split_words,
)
from pixellm.tokenizer import IMAGE_TOKEN

log = logging.getLogger(__name__)

DATASET_VERSION = "shapes-v1"
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB = (236, 234, 228)
NOISE = 8  # uniform per-channel noise amplitude, 0-255 units
AREA_AT_64 = {"small": 90.0, "large": 340.0}  # target shape areas in pixels for a 64 px image
AREA_JITTER = 0.1
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 20
PLACEMENT_TRIES = 20  # positions tried per shape before it is left out
SHAPE_COUNT_PROBS = (0.05, 0.15, 0.25, 0.3, 0.25)  # P(1 shape), ..., P(5 shapes)
SPLITS = ("train", "val")
COLOUR_P = 0.3  # an image has 1 + Binomial(min(n, 3) - 1, COLOUR_P) colours: few, so they repeat


@dataclass(frozen=True)
class ShapeSpec:
    """A shape to draw: attributes, centre (x, y) in pixels and area in pixels."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    area: float

    def extent(self) -> float:
        """Largest distance from the centre to the outline."""
        return _extent(self.kind, self.area)

    def polygon(self) -> list[float] | None:
        """COCO polygon ``[x0, y0, x1, y1, ...]``, or None for a circle."""
        e = self.extent()
        if self.kind == "square":
            h = e
            corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
        elif self.kind == "diamond":
            corners = [(0.0, -e), (e, 0.0), (0.0, e), (-e, 0.0)]
        elif self.kind == "triangle":
            corners = [
                (e * math.cos(a), e * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        else:
            return None
        return [round(v, 2) for dx, dy in corners for v in (self.cx + dx, self.cy + dy)]


def _extent(kind: str, area: float) -> float:
    """Circle radius, square half-side, diamond half-diagonal or triangle circumradius."""
    if kind == "circle":
        return math.sqrt(area / math.pi)
    if kind == "square":
        return math.sqrt(area) / 2
    if kind == "diamond":
        return math.sqrt(area / 2)
    return math.sqrt(area / (3 * math.sqrt(3) / 4))


def rasterise(spec: ShapeSpec, size: int) -> np.ndarray:
    """Full (unoccluded) mask of ``spec``: (size, size) bool; polygons via pycocotools."""
    poly = spec.polygon()
    if poly is None:
        centres = np.arange(size) + 0.5
        d2 = (centres[None, :] - spec.cx) ** 2 + (centres[:, None] - spec.cy) ** 2
        return d2 <= spec.extent() ** 2
    rle = mask_utils.frPyObjects([poly], size, size)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _sample_attributes(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, colour, size) per shape, drawn from few colours and kinds so both repeat."""
    n = int(rng.choice(len(SHAPE_COUNT_PROBS), p=SHAPE_COUNT_PROBS)) + 1
    palette = rng.choice(COLOURS, 1 + rng.binomial(min(n, 3) - 1, COLOUR_P), replace=False)
    kinds = rng.choice(KINDS, 1 + rng.binomial(min(n, 4) - 1, 0.5), replace=False)
    return [
        (
            str(kinds[rng.integers(len(kinds))]),
            str(palette[rng.integers(len(palette))]),
            SIZES[rng.integers(2)],
        )
        for _ in range(n)
    ]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a (H, W) bool mask by one pixel in all 8 directions."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    grown = rows.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _fits(
    spec: ShapeSpec,
    mask: np.ndarray,
    specs: list[ShapeSpec],
    full: list[np.ndarray],
    visible: list[np.ndarray],
) -> bool:
    """Whether ``spec`` (drawn on top, full mask ``mask``) keeps every earlier shape visible
    enough and touches no earlier shape of its colour (the two would read as one blob)."""
    grown = None
    for other, other_full, other_visible in zip(specs, full, visible, strict=True):
        left = int((other_visible & ~mask).sum())
        if left < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * other_full.sum()):
            return False
        if other.colour == spec.colour:
            grown = _dilate(mask) if grown is None else grown
            if (grown & other_full).any():
                return False
    return True


def _place(rng: np.random.Generator, size: int) -> tuple[list[ShapeSpec], list[np.ndarray]]:
    """Place shapes one by one, retrying a shape's position until it fits, dropping it if stuck.

    Returns:
        The specs in drawing order and their visible masks, each (size, size) bool.
    """
    scale = (size / 64) ** 2
    specs: list[ShapeSpec] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for kind, colour, size_word in _sample_attributes(rng):
        area = AREA_AT_64[size_word] * scale * (1 + AREA_JITTER * rng.uniform(-1, 1))
        e = _extent(kind, area) + 1
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(e, size - e, 2)
            spec = ShapeSpec(kind, colour, size_word, float(cx), float(cy), area)
            mask = rasterise(spec, size)
            if _fits(spec, mask, specs, full, visible):
                visible = [v & ~mask for v in visible] + [mask]
                specs.append(spec)
                full.append(mask)
                break
    return specs, visible


def _segmentation(
    spec: ShapeSpec, visible: np.ndarray, occluded: bool
) -> dict[str, Any] | list[list[float]]:
    """COCO polygon for an unoccluded polygon shape, else compressed RLE with str counts."""
    poly = spec.polygon()
    if poly is not None and not occluded:
        return [poly]
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _render(
    specs: list[ShapeSpec], visible: list[np.ndarray], rng: np.random.Generator, size: int
) -> np.ndarray:
    """RGB image (size, size, 3) uint8: background, shapes' visible pixels, then noise."""
    image = np.empty((size, size, 3), np.int16)
    image[:] = BACKGROUND_RGB
    for spec, m in zip(specs, visible, strict=True):
        image[m] = COLOUR_RGB[spec.colour]
    image += rng.integers(-NOISE, NOISE + 1, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_record(
    rng: np.random.Generator, size: int, file_name: str, first_id: int
) -> tuple[dict[str, Any], np.ndarray]:
    """One MUSE record and its image (size, size, 3) uint8."""
    specs, visible = _place(rng, size)
    image = _render(specs, visible, rng, size)
    anns, shapes = [], []
    for i, (spec, m) in enumerate(zip(specs, visible, strict=True)):
        occluded = bool(m.sum() < rasterise(spec, size).sum())
        seg = _segmentation(spec, m, occluded)
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        shape = VisibleShape(
            spec.kind,
            spec.colour,
            spec.size,
            int(m.sum()),
            (float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
        )
        shapes.append(shape)
        anns.append(
            {
                "id": first_id + i,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "category_id": KINDS.index(spec.kind) + 1,
                "category_name": spec.kind,
                "rephrased_name": shape.name,
                "segmentation": seg,
            }
        )
    qas = make_questions(shapes, size, int(rng.integers(2, 4)), rng)
    record = {
        "file_name": file_name,
        "height": size,
        "width": size,
        "ann_list": anns,
        "questions": [qa.question for qa in qas],
        "answers": [[anns[i] for i in qa.targets] for qa in qas],
        "text_answers": [qa.answer for qa in qas],
    }
    return record, image


def generate_shapes_dataset(
    out_dir: Path, seed: int, num_train_images: int, num_val_images: int, image_size: int = 64
) -> None:
    """Write ``images/{train,val}/NNNNNN.png`` and ``muse_{train,val}.json`` atomically.

    Generation happens in a temporary folder next to ``out_dir`` that is renamed at the end, so an
    interrupted run never leaves a partial dataset. ``file_name`` is relative to ``out_dir/images``.

    Raises:
        FileExistsError: If ``out_dir`` already exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not empty; remove it or pick another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split_index, (split, count) in enumerate(
            zip(SPLITS, (num_train_images, num_val_images), strict=True)
        ):
            (tmp / "images" / split).mkdir(parents=True)
            records = []
            for index in range(count):
                rng = np.random.default_rng([seed, split_index, index])
                file_name = f"{split}/{index:06d}.png"
                record, image = make_record(
                    rng, image_size, file_name, first_id=(split_index * 10**6 + index) * 10 + 1
                )
                Image.fromarray(image).save(tmp / "images" / file_name, format="PNG")
                records.append(record)
            (tmp / f"muse_{split}.json").write_text(json.dumps(records, separators=(",", ":")))
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _is_complete(path: Path) -> bool:
    return all((path / f"muse_{split}.json").is_file() for split in SPLITS)


def shapes_dataset_dir(
    cache_dir: str | Path,
    seed: int,
    num_train_images: int,
    num_val_images: int,
    image_size: int = 64,
) -> Path:
    """The dataset folder ``cache_dir/shapes-v1-seed{seed}-{ntrain}-{nval}-{size}``."""
    name = f"{DATASET_VERSION}-seed{seed}-{num_train_images}-{num_val_images}-{image_size}"
    return Path(cache_dir).expanduser() / name


def ensure_shapes_dataset(
    cache_dir: str | Path,
    seed: int,
    num_train_images: int,
    num_val_images: int,
    image_size: int = 64,
) -> Path:
    """Return ``shapes_dataset_dir(...)``, generating the dataset on first use (safe when several
    processes race: the first rename wins, the others reuse its result)."""
    path = shapes_dataset_dir(cache_dir, seed, num_train_images, num_val_images, image_size)
    if _is_complete(path):
        return path
    start = time.perf_counter()
    try:
        generate_shapes_dataset(path, seed, num_train_images, num_val_images, image_size)
    except OSError:
        if not _is_complete(path):  # not a lost race with another process: a real failure
            raise
    log.info("shapes dataset ready at %s (%.1f s)", path, time.perf_counter() - start)
    return path


def shapes_corpus() -> Iterator[str]:
    """Yield every word and punctuation mark the generator and the conversation templates emit."""
    for text in (*question_corpus(), *template_words()):
        yield from split_words(text.replace(IMAGE_TOKEN, " "))
