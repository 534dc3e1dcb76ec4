"""REFER's ``refs(<split_by>).p`` files: a restricted unpickler, a JSON form, and the converter.

The released refs files are Python pickles: a list of dicts (``ref_id``, ``ann_id``,
``image_id``, ``split``, ``sentences`` = [{``sent``, ``raw``, ``tokens``, ``sent_id``}], ...).
Unpickling can run arbitrary code, so ``RestrictedUnpickler`` refuses every global (class,
function): only the opcodes of plain containers and scalars (list, dict, tuple, str, bytes, int,
float, bool, None) remain. ``pixellm convert-refs SRC.p DST.json`` writes the same data as JSON once.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

from pixellm.data.loading import read_json

REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits plain containers and scalars only; every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused to load the global {module}.{name}: a refs file may only hold plain "
            "containers and scalars (lists, dicts, strings, numbers)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: a refs file holds plain data only")


def unpickle_plain(path: str | Path) -> Any:
    """Load a pickle of plain data with ``RestrictedUnpickler`` (Python 2 strings read as UTF-8).

    Raises:
        ValueError: If the file holds anything but plain data or is not a pickle (names the file).
    """
    path = Path(path)
    with path.open("rb") as handle:
        try:
            return RestrictedUnpickler(handle, encoding="utf-8").load()
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path}: not a plain-data pickle: {err}") from err


def _check_refs(path: Path, refs: Any) -> list[dict[str, Any]]:
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"{path}: ref {index}: expected a dict, got {type(ref).__name__}")
        for field in REF_FIELDS:
            if field not in ref:
                raise ValueError(f"{path}: ref {index}: field {field!r}: missing")
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sentences
        ):
            raise ValueError(
                f"{path}: ref {index}: field 'sentences': expected a list of {{'sent': str, ...}}"
            )
    return refs


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """The refs of a REFER ``.p`` (restricted unpickling) or converted ``.json`` file, checked.

    Raises:
        ValueError: On unsafe or malformed content, naming the file, ref index and field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: refs file not found")
    refs = read_json(path) if path.suffix == ".json" else unpickle_plain(path)
    return _check_refs(path, refs)


def convert_refs_command(argv: list[str]) -> None:
    """``pixellm convert-refs SRC.p DST.json``: convert a refs pickle to JSON (restricted load)."""
    parser = argparse.ArgumentParser(
        prog="pixellm convert-refs",
        description="Convert a REFER refs pickle (e.g. refs(unc).p) to JSON, loading it with an "
        "unpickler that admits plain data only.",
    )
    parser.add_argument("source", type=Path, help="the refs(<split_by>).p pickle")
    parser.add_argument("destination", type=Path, help="the JSON file to write")
    args = parser.parse_args(argv)
    refs = load_refs(args.source)
    args.destination.write_text(json.dumps(refs))
    print(f"wrote {len(refs)} refs from {args.source} to {args.destination}")
