"""Image files of datasets: paths confined to their root, and decoding to RGB."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from PIL import Image


def confined_path(root: str | Path, relative: str) -> Path:
    """``root / relative``, refusing paths that could leave ``root``.

    Raises:
        ValueError: For absolute paths, drive letters and ``..`` components (says which root).
    """
    parts = PurePosixPath(str(relative).replace("\\", "/"))
    if (
        not parts.parts
        or parts.is_absolute()
        or ".." in parts.parts
        or ":" in parts.parts[0]
    ):
        raise ValueError(f"{relative!r} escapes the image root {root}")
    return Path(root) / parts


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB at its stored size.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file is not a decodable image (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image: {err}") from err
