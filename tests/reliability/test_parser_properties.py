"""Property tests: whatever the JSON or RLE input, the parsers return a valid result or raise
``DataError``, never anything else (and never a mask of another size)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from muse_files import H, W, record, write_dataset
from pycocotools import mask as mask_utils

from pixellm.data.errors import DataError
from pixellm.data.muse import MuseDataset
from pixellm.data.segmentation import compressed_rle_counts, decode_segmentation

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.sampled_from(["size", "counts", "id", "x"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
coordinates = st.one_of(st.integers(-20, 20), st.floats(-20, 20), st.floats(allow_nan=True, allow_infinity=True))


def _segmentations(counts: st.SearchStrategy) -> st.SearchStrategy:
    """Anything JSON-like, polygons, or RLE dicts whose ``counts`` come from ``counts``."""
    return st.one_of(
        json_values,
        st.lists(st.lists(coordinates, max_size=12), max_size=3),  # polygons
        st.fixed_dictionaries(
            {"size": st.sampled_from([[H, W], [W, H], [H, W, 1], ["6", "8"]]), "counts": counts}
        ),
    )


text_or_list_counts = st.one_of(
    st.text(st.characters(min_codepoint=0, max_codepoint=130), max_size=12),
    st.lists(st.integers(-5, 60), max_size=6),
)
segmentations = _segmentations(text_or_list_counts | st.binary(max_size=12))  # in memory: bytes too
json_segmentations = _segmentations(text_or_list_counts)  # what a JSON file can hold


def _decode_or_data_error(segmentation: Any) -> np.ndarray | None:
    try:
        mask = decode_segmentation(segmentation, H, W)
    except DataError:
        return None
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and mask.any() and mask.max() == 1
    return mask


@FAST
@given(segmentations)
def test_decode_segmentation_returns_a_mask_or_raises_data_error(segmentation: Any) -> None:
    _decode_or_data_error(segmentation)


@FAST
@given(st.text(max_size=30))
def test_compressed_rle_parser_only_raises_data_error(counts: str) -> None:
    try:
        runs = compressed_rle_counts(counts)
    except DataError:
        return
    assert all(isinstance(r, int) for r in runs)


@FAST
@given(st.lists(st.booleans(), min_size=H * W, max_size=H * W))
def test_compressed_rle_parser_matches_pycocotools(pixels: list[bool]) -> None:
    mask = np.array(pixels, np.uint8).reshape(H, W)
    counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
    runs = compressed_rle_counts(counts)
    assert sum(runs) == H * W and all(r >= 0 for r in runs)
    flat = np.repeat(np.arange(len(runs)) % 2, runs).reshape(W, H).T  # column-major runs of 0, 1
    assert np.array_equal(flat, mask)
    if mask.any():
        assert np.array_equal(_decode_or_data_error({"size": [H, W], "counts": counts}), mask)


def _records() -> st.SearchStrategy:
    fields = st.fixed_dictionaries(
        {},
        optional={
            "file_name": st.sampled_from(["img.png", "../x.png", "/etc/passwd", "missing.png"]) | json_values,
            "height": st.sampled_from([H, 0, "6"]) | json_values,
            "width": st.sampled_from([W, -1]) | json_values,
            "questions": st.lists(st.text(max_size=6), max_size=2) | json_values,
            "answers": st.lists(st.lists(st.fixed_dictionaries({"id": st.integers(0, 2), "segmentation": json_segmentations}), max_size=2), max_size=2)
            | json_values,
            "text_answers": json_values,
        },
    )
    return st.lists(st.one_of(fields, st.builds(record), json_values), max_size=3)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_records().map(json.dumps).map(str.encode), st.binary(max_size=40)))
def test_muse_reader_only_raises_data_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_dataset(Path(folder), [])
        path.write_bytes(content)
        try:
            dataset = MuseDataset(path, Path(folder) / "images")
        except DataError:
            return
        for i in range(len(dataset)):
            try:
                sample = dataset[i]
            except DataError:
                continue
            assert sample.masks.shape[1:] == (sample.image.height, sample.image.width)
            assert sample.answer.count("{seg}") == sample.masks.shape[0]
