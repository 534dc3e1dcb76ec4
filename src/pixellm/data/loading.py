"""Small helpers shared by the dataset readers: JSON files and values, confined images, seeded choices."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixellm.data.errors import DataError
from pixellm.data.images import confined_path, open_rgb


def is_number(value: Any) -> bool:
    """Whether a JSON value is a finite number (not a boolean, not NaN or Infinity, which JSON parsing accepts)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    """Whether a JSON value is an integer >= 1 (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_json(path: str | Path, encodings: tuple[str, ...] = ("utf-8",)) -> Any:
    """Parse a JSON file, trying ``encodings`` in order.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If no encoding decodes it or it is not valid JSON (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from err
    raise ValueError(f"{path}: not decodable as any of {list(encodings)}")


def open_image(
    root: str | Path, relative: str, where: str, size: tuple[int, int] | None = None
) -> Image.Image:
    """Open ``root / relative`` as RGB, refusing paths that leave ``root``.

    Args:
        root: The image root folder.
        relative: Path of the image under ``root``.
        where: Text naming the record in error messages (file, record, field).
        size: Expected (height, width), checked when given.

    Raises:
        DataError: If the path escapes ``root``, the image is missing or unreadable, or it has
            another size; the message starts with ``where``. Raised in ``__getitem__``, it makes
            ``pixellm.reliability.skipping`` skip and count the sample.
    """
    try:
        image = open_rgb(confined_path(root, relative))
    except DataError as err:
        raise DataError(str(err), file=where) from err
    if size is not None and (image.height, image.width) != tuple(size):
        raise DataError(
            f"annotations are {size[0]}x{size[1]} but the image is {image.height}x{image.width} "
            "(height x width)",
            file=where,
            hint="fix the annotation's size or the image",
        )
    return image


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator fixed by ``seed`` and ``keys`` (e.g. the item index): the same in every worker.

    Raises:
        ValueError: If the seed or a key is negative.
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be >= 0, got seed={seed} keys={keys}")
    return np.random.default_rng([seed, *keys])
