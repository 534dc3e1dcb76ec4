"""Bad and unusual image files: what ``open_rgb`` / ``confined_path`` do with each."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixellm.data.errors import DataError
from pixellm.data.images import (
    ALPHA_BACKGROUND,
    EXIF_ORIENTATION_KEY,
    EXIF_ORIENTATION_TAG,
    MAX_PIXELS_ENV,
    confined_path,
    open_rgb,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)  # (H, W, 3) uint8


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.png: image not found\. check the image root"):
        open_rgb(tmp_path / "gone.png")


def test_zero_bytes(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jpg: image file is empty \(0 bytes\)"):
        open_rgb(tmp_path / "empty.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match=rf"cut\.{fmt.lower()}: not a readable image \(OSError.*truncated"):
        open_rgb(path)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(DataError, match=r"notes\.png: not a readable image \(UnidentifiedImageError"):
        open_rgb(tmp_path / "notes.png")


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    image = open_rgb(tmp_path / "g.png")
    assert image.mode == "RGB" and image.size == (3, 2)
    assert (_pixels(image) == 77).all()


def test_rgba_is_composited_over_the_mean_colour(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # opaque red
    rgba[0, 1] = (200, 0, 0, 0)  # fully transparent: the background shows
    rgba[1, 0] = (200, 0, 0, 128)  # half: (200 * 128 + 124 * 127) / 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = _pixels(open_rgb(tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert tuple(pixels[0, 1]) == ALPHA_BACKGROUND
    assert abs(int(pixels[1, 0, 0]) - round((200 * 128 + 124 * 127) / 255)) <= 1


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert [tuple(p) for p in _pixels(open_rgb(tmp_path / "p.png"))[0]] == [(255, 0, 0), (0, 0, 255)]
    palette.save(tmp_path / "pt.png", transparency=0)  # index 0 (red) is transparent
    pixels = _pixels(open_rgb(tmp_path / "pt.png"))[0]
    assert [tuple(p) for p in pixels] == [ALPHA_BACKGROUND, (0, 0, 255)]


def test_sixteen_bit_keeps_the_top_byte_not_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = _pixels(open_rgb(tmp_path / "deep.png"))
    assert pixels[0, :, 0].tolist() == [0, 100, 255]  # Pillow's convert("RGB") gives 0, 255, 255


def test_cmyk_jpeg_is_converted(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    pixels = _pixels(open_rgb(tmp_path / "c.jpg")).astype(int)
    assert pixels.shape == (4, 4, 3)
    assert (pixels[..., 0] > 240).all() and (pixels[..., 1:] < 15).all()  # red


def test_exif_orientation_is_applied_and_reported(tmp_path: Path) -> None:
    stored = np.zeros((2, 3, 3), np.uint8)  # 3 wide, 2 high; top-left pixel white
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100)
    image = open_rgb(tmp_path / "r.jpg")
    assert image.size == (2, 3) and image.info[EXIF_ORIENTATION_KEY] == 6
    assert _pixels(image)[0, 1].min() > 200  # the white corner is now top-right
    Image.fromarray(stored).save(tmp_path / "plain.jpg")
    assert open_rgb(tmp_path / "plain.jpg").info[EXIF_ORIENTATION_KEY] == 1


def test_one_by_one(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    image = open_rgb(tmp_path / "dot.png")
    assert image.size == (1, 1) and tuple(_pixels(image)[0, 0]) == (1, 2, 3)


def test_decompression_bomb_limit_is_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 M pixels, ~10 kB on disk
    with pytest.raises(DataError, match=r"bomb\.png: 10000x10000 image exceeds the limit of 40000000"):
        open_rgb(tmp_path / "bomb.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "599")
    with pytest.raises(DataError, match=rf"exceeds the limit of 599 pixels.*raise \${MAX_PIXELS_ENV}"):
        open_rgb(tmp_path / "small.png")
    assert open_rgb(tmp_path / "small.png", max_pixels=600).size == (30, 20)


@pytest.mark.parametrize(
    "relative", ["../../etc/passwd", "/etc/passwd", "a/../../b.png", "C:/x.png", "", "a\x00.png"]
)
def test_paths_escaping_the_root(tmp_path: Path, relative: str) -> None:
    with pytest.raises(DataError, match="escapes the image root"):
        confined_path(tmp_path, relative)
    assert confined_path(tmp_path, "sub/x.png") == tmp_path / "sub" / "x.png"


def test_invalid_exif_orientation_keeps_the_stored_pixels(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 42  # not an orientation
    Image.new("RGB", (3, 2), (9, 9, 9)).save(tmp_path / "odd.jpg", exif=exif)
    image = open_rgb(tmp_path / "odd.jpg")
    assert image.size == (3, 2) and image.info[EXIF_ORIENTATION_KEY] == 1
