"""Decoding COCO segmentations (polygons, compressed and uncompressed RLE) with every input checked.

pycocotools trusts its input: a malformed RLE string decodes to a mask of another size or garbage,
and huge polygon coordinates overflow. So every form is validated in Python first and any problem
is a :class:`~pixellm.data.errors.DataError` (the caller adds file, record and field). Decisions:

- polygons are lists of finite numbers in (x, y) pairs; those with fewer than 3 points are ignored
  (pycocotools would read a 2-point polygon as a box); a point more than ``POLYGON_MARGIN``
  pixels outside the image is an error (the annotation was drawn on another image size), a point
  just outside is clipped by the rasteriser;
- an RLE's ``size`` must be the image's ``[height, width]`` and its runs must cover it exactly; a
  list of RLEs is their union; crowd annotations (``iscrowd: 1``, uncompressed RLE) decode like
  any other region;
- a segmentation that decodes to an empty mask is an error (its target could never be learnt),
  unless the caller allows it (COCO-style loaders keep empty masks, as the release does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pixellm.data.errors import DataError
from pixellm.data.loading import is_number

POLYGON_MARGIN = 1.0  # pixels a polygon point may lie outside the image (rounding of annotators)
RLE_CHAR_MIN, RLE_CHAR_MAX = 48, 48 + 63  # the alphabet of COCO's compressed RLE strings


def _check_polygons(segmentation: list, height: int, width: int) -> list[list[float]]:
    """The polygons as lists of floats, checked (see the module docstring)."""
    polygons = []
    for p, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or not all(is_number(v) for v in polygon):
            raise DataError(f"polygon {p} is not a list of finite numbers")
        if len(polygon) % 2:
            raise DataError(f"polygon {p} has an odd number ({len(polygon)}) of coordinates")
        if len(polygon) < 6:
            continue  # fewer than 3 points: no area
        xs, ys = polygon[0::2], polygon[1::2]
        if (
            min(xs) < -POLYGON_MARGIN
            or max(xs) > width + POLYGON_MARGIN
            or min(ys) < -POLYGON_MARGIN
            or max(ys) > height + POLYGON_MARGIN
        ):
            raise DataError(
                f"polygon {p} spans x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)}, outside the "
                f"{width}x{height} image",
                hint="was it drawn on another image size?",
            )
        polygons.append([float(v) for v in polygon])
    return polygons


def compressed_rle_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString`` in Python).

    Raises:
        DataError: For characters outside the alphabet or a truncated last run.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise DataError("compressed RLE counts end in the middle of a run")
            code = ord(counts[pos]) - RLE_CHAR_MIN
            if not 0 <= code <= RLE_CHAR_MAX - RLE_CHAR_MIN:
                raise DataError(f"compressed RLE counts hold the invalid character {counts[pos]!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_rle(segmentation: dict, height: int, width: int) -> dict[str, Any]:
    """The RLE in pycocotools' compressed form, checked against the image size."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise DataError(f"RLE size must be [height, width] integers, got {size!r}")
    if list(size) != [height, width]:
        raise DataError(
            f"RLE size {list(size)} differs from the image's {[height, width]}",
            hint="the annotation belongs to another image or size",
        )
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as err:
            raise DataError("compressed RLE counts are not ASCII") from err
    if isinstance(counts, str):
        runs = compressed_rle_counts(counts)
    elif isinstance(counts, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        runs = counts
    else:
        raise DataError("RLE counts must be a string or a list of integers")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise DataError(
            f"RLE runs sum to {sum(runs)} pixels with negatives {any(r < 0 for r in runs)}; the "
            f"{height}x{width} image has {height * width}"
        )
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    return mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)


def decode_segmentation(
    segmentation: Any, height: int, width: int, allow_empty: bool = False
) -> np.ndarray:
    """Decode a COCO segmentation (polygons, one RLE or a list of RLEs) to (H, W) uint8 in {0, 1}.

    Args:
        segmentation: A list of polygons ``[[x0, y0, x1, y1, ...], ...]``, an RLE dict
            ``{"size": [H, W], "counts": str | list[int]}`` or a list of RLE dicts (merged).
        height: H of the image.
        width: W of the image.
        allow_empty: Return an all-zero mask for a segmentation without area instead of raising.

    Raises:
        DataError: If the segmentation is malformed, of another size or (unless ``allow_empty``)
            empty (see the module docstring); the caller adds file, record and field.
    """
    if isinstance(segmentation, dict):
        parts = [_check_rle(segmentation, height, width)]
    elif isinstance(segmentation, list) and segmentation and all(isinstance(p, dict) for p in segmentation):
        parts = [_check_rle(p, height, width) for p in segmentation]
    elif isinstance(segmentation, list):
        polygons = _check_polygons(segmentation, height, width)
        parts = mask_utils.frPyObjects(polygons, height, width) if polygons else []
    else:
        raise DataError(f"unknown segmentation of type {type(segmentation).__name__}")
    mask = (
        mask_utils.decode(mask_utils.merge(parts)).astype(np.uint8)
        if parts
        else np.zeros((height, width), np.uint8)
    )  # (H, W)
    if not allow_empty and not mask.any():
        raise DataError(
            "the segmentation has no area (no polygon with >= 3 points, or an empty mask)"
        )
    return mask
