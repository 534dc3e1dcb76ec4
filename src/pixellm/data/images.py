"""Image files of datasets: paths confined to their root, and decoding any image file to RGB.

Every dataset opens its images through :func:`open_rgb`, which decides once for all of them:

- what cannot be used raises :class:`~pixellm.data.errors.DataError` naming the file (missing,
  zero bytes, truncated, not an image, more pixels than the decompression-bomb limit);
- grayscale, 1-bit, palette and CMYK images are converted to RGB; 16-bit images keep their top
  8 bits (``value >> 8``), not Pillow's clipping at 255;
- transparent images (RGBA, LA, palette or RGB/L with a transparency key) are composited over
  ``ALPHA_BACKGROUND``, the ImageNet mean colour, so that transparent pixels normalise to about 0,
  the value of padding;
- the EXIF orientation is applied (the image as a viewer shows it, as ``cv2.imread`` in the
  released code does). Annotations' ``height``/``width`` must describe the oriented image: the
  datasets compare them and skip a sample whose sizes differ (see ``EXIF_ORIENTATION_KEY``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from pixellm.data.errors import DataError

MAX_PIXELS_ENV = "PIXELLM_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 7300 x 5500: larger files are refused before decoding
ALPHA_BACKGROUND = (124, 116, 104)  # ImageNet mean (0-255), the DEFAULT_PIXEL_MEAN rounded
EXIF_ORIENTATION_KEY = "pixellm_exif_orientation"  # info key: the EXIF orientation applied (1-8)
EXIF_ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def confined_path(root: str | Path, relative: str) -> Path:
    """``root / relative``, refusing paths that could leave ``root``.

    Symbolic links inside ``root`` are followed as they are (datasets are often linked in).

    Raises:
        DataError: For empty or absolute paths, drive letters, NUL bytes and ``..`` components
            (says which root).
    """
    text = str(relative).replace("\\", "/")
    parts = PurePosixPath(text)
    if (
        not parts.parts
        or "\x00" in text
        or parts.is_absolute()
        or ".." in parts.parts
        or ":" in parts.parts[0]
    ):
        raise DataError(
            f"{relative!r} escapes the image root {root}",
            hint="image paths must be relative to the root, without '..'",
        )
    return Path(root) / parts


def max_image_pixels() -> int:
    """The decompression-bomb limit: ``$PIXELLM_MAX_IMAGE_PIXELS``, else ``DEFAULT_MAX_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"${MAX_PIXELS_ENV} must be an integer pixel count, got {value!r}") from err


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale to 8 bits by its top byte; float clipped to 0-255."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)  # (H, W)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB (see the module docstring)."""
    image = _eight_bit(image)
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when absent, invalid or unreadable (a
    broken EXIF block does not make the pixels unusable)."""
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # Pillow raises many types on malformed EXIF
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def open_rgb(
    path: str | Path,
    max_pixels: int | None = None,
    background: tuple[int, int, int] = ALPHA_BACKGROUND,
) -> Image.Image:
    """Decode an image file to RGB, EXIF orientation applied.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels (default: :func:`max_image_pixels`); checked
            from the header, before decoding.
        background: RGB colour transparent pixels are composited over.

    Returns:
        The RGB image; ``info[EXIF_ORIENTATION_KEY]`` holds the EXIF orientation that was applied
        (1 when there was none).

    Raises:
        DataError: Naming the file, if it is missing, empty, truncated, not an image, too large or
            of a mode that has no RGB conversion.
    """
    path = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if not path.is_file():
        raise DataError("image not found", file=path, hint="check the image root and file name")
    if path.stat().st_size == 0:
        raise DataError("image file is empty (0 bytes)", file=path, hint="re-download the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides
            with Image.open(path) as image:
                if image.width * image.height > limit:
                    raise DataError(
                        f"{image.width}x{image.height} image exceeds the limit of {limit} pixels",
                        file=path,
                        hint=f"shrink the image or raise ${MAX_PIXELS_ENV}",
                    )
                orientation = exif_orientation(image)
                image.load()
                rgb = to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
    except DataError:
        raise
    except Exception as err:  # Pillow's decoders raise many types on malformed files
        raise DataError(
            f"not a readable image ({type(err).__name__}: {err})",
            file=path,
            hint="re-download or re-encode the file, or remove its record",
        ) from err
    rgb.info[EXIF_ORIENTATION_KEY] = orientation
    return rgb
