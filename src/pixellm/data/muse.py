"""Reader of MUSE-format JSON (the real MUSE release and the generated shapes dataset alike).

A file is a JSON list of records, one per image: ``file_name`` (a COCO train2014 image) or
``coco_url`` (train2017/val2017), ``height``, ``width``, ``ann_list`` (``bbox`` xywh,
``category_id`` (LVIS), ``category_name``, ``rephrased_name``, ``segmentation``), ``questions``,
``answers`` (per question, the annotation dicts it refers to, in text order) and optional
``text_answers`` (per question, text whose ``{seg}`` placeholders match ``answers[q]`` one to one).
Records whose ``text_answers`` are missing or have the wrong number of placeholders (known defects
of the released files) get an answer built from the annotations' names; one summary warning
counts them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pixellm.data.conversation import SEG_PLACEHOLDER
from pixellm.data.errors import DataError
from pixellm.data.images import EXIF_ORIENTATION_KEY, confined_path, open_rgb
from pixellm.data.loading import is_number, is_positive_int, seeded_rng
from pixellm.data.sample import Sample
from pixellm.data.seg_prompts import SENTENCE, wrap_sentence
from pixellm.data.segmentation import decode_segmentation

REQUIRED_FIELDS = ("height", "width", "questions", "answers")
FILE_NAME_SPLIT = "train2014"  # MUSE records with `file_name` are COCO train2014 images
ImageRoot = str | list[str] | dict[str, str]  # one folder, folders to try, or split -> folder
ARTICLES = ("the ", "a ", "an ")
EMPTY_FALLBACK_ANSWER = "there is no such object."


def _join_names(names: list[str]) -> str:
    """``"A {seg}, B {seg} and C {seg}."`` for names [A, B, C]."""
    items = [f"{n} {SEG_PLACEHOLDER}" for n in names]
    if not items:
        return EMPTY_FALLBACK_ANSWER
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text + "."


def fallback_answer(annotations: list[dict[str, Any]]) -> str:
    """Answer from ``rephrased_name`` (else ``category_name``), one ``{seg}`` per annotation."""
    names = []
    for ann in annotations:
        name = str(ann.get("rephrased_name") or ann.get("category_name") or "object").strip()
        names.append(name if name.lower().startswith(ARTICLES) else "the " + name)
    return _join_names(names)


def target_description(annotation: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    """``{"description", "bbox"}`` of one target: its name and [x0, y0, x1, y1] box.

    The box is the annotation's ``bbox`` (COCO xywh) when it is four finite numbers, else the mask's extent.
    """
    name = str(annotation.get("rephrased_name") or annotation.get("category_name") or "object")
    bbox = annotation.get("bbox")
    if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox):
        x, y, w, h = (float(v) for v in bbox)
        box = [x, y, x + w, y + h]
    else:
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] if xs.size else []
    return {"description": name, "bbox": box}


class MuseDataset(Dataset[Sample]):
    """One item per (record, question) of a MUSE JSON file.

    Args:
        json_path: The MUSE JSON file.
        image_root: Where the images are, kept strictly inside: one folder or a list of folders
            (tried in order) that ``file_name``, ``coco_url``'s basename or its
            ``split/basename`` are relative to; or a mapping from COCO split to folder, e.g.
            ``{"train2014": ..., "train2017": ..., "val2017": ...}``: ``file_name`` records are
            looked up under ``train2014`` (MUSE's convention), ``coco_url`` records under the
            URL's folder name, by basename.
        question_templates: None: each question as written (the paper). Else templates holding
            ``{sent}`` once, one of which wraps each question, drawn from ``(seed, epoch, item)``
            (``draw``; ``dataset[i]`` is epoch 0's, fixed for evaluation). The release wraps every
            MUSE question, in training and evaluation, in one of ``seg_prompts.LONG_QUESTIONS``
            ("<question> Please respond with segmentation mask." / "... Please output segmentation
            mask."), drawn at random at every read; a converted release model expects them.
        seed: Seed of the template draws.

    Attributes:
        num_fallback_answers: How many questions got an answer built from annotation names.

    Raises:
        ValueError: On invalid JSON, a missing/ill-typed field, or a record whose split has no
            folder in the mapping, naming file, record and field.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: ImageRoot | Path,
        question_templates: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.json_path = Path(json_path)
        self.image_root = image_root
        if question_templates is not None and (
            not question_templates or any(t.count(SENTENCE) != 1 for t in question_templates)
        ):
            raise ValueError(f"question_templates must be templates holding {SENTENCE} once each, got {question_templates!r}")
        self.question_templates = tuple(question_templates or ())
        self.seed = seed
        try:
            records = json.loads(self.json_path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"not UTF-8 at byte {err.start}", file=self.json_path, hint="re-encode it as UTF-8"
            ) from err
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON: {err}", file=self.json_path) from err
        if not isinstance(records, list):
            raise DataError(
                f"expected a JSON list of records, got {type(records).__name__}", file=self.json_path
            )
        self.records: list[dict[str, Any]] = records
        self.items: list[tuple[int, int]] = []
        self.answers: list[str] = []
        self.image_paths: list[list[tuple[Path, str]]] = []
        self.num_fallback_answers = 0
        for index, record in enumerate(records):
            self._add_record(index, record)
        if self.num_fallback_answers:
            message = (
                f"{self.json_path}: {self.num_fallback_answers} of {len(self.items)} questions "
                "had missing text_answers or a {seg} count unlike their answers; their answers "
                "were built from rephrased_name/category_name"
            )
            warnings.warn(message, stacklevel=2)

    def _error(self, index: int, field: str, problem: str, hint: str | None = None) -> DataError:
        return DataError(
            problem,
            file=self.json_path,
            index=index,
            field=field,
            hint=hint or "fix or remove the record",
        )

    def _candidates(self, index: int, record: dict[str, Any]) -> list[tuple[Path, str]]:
        """(root, relative path) pairs to try for the record's image, in order; absolute paths
        and ``..`` are rejected."""
        if "file_name" in record:
            field, split = "file_name", FILE_NAME_SPLIT
            relative = [str(record["file_name"])]
        elif "coco_url" in record:
            url = PurePosixPath(str(record["coco_url"]).split("://")[-1])
            field, split = "coco_url", url.parent.name
            relative = [url.name, f"{split}/{url.name}"]
        else:
            raise self._error(index, "file_name", "missing (and no 'coco_url' either)")
        if isinstance(self.image_root, Mapping):
            if split not in self.image_root:
                raise self._error(
                    index, field, f"no image folder for COCO split {split!r}; image_root has {sorted(self.image_root)}"
                )
            roots, relative = [Path(self.image_root[split])], relative[:1]
        elif isinstance(self.image_root, (str, Path)):
            roots = [Path(self.image_root)]
        elif isinstance(self.image_root, Sequence):
            roots = [Path(r) for r in self.image_root]
        else:
            raise TypeError(f"image_root must be a folder, a list or a mapping, got {type(self.image_root).__name__}")
        candidates = [(root, name) for root in roots for name in relative]
        for root, name in candidates:
            try:
                confined_path(root, name)
            except DataError as err:
                raise self._error(index, field, err.problem) from err
        return candidates

    def _add_record(self, index: int, record: Any) -> None:
        if not isinstance(record, dict):
            raise DataError(
                f"expected an object, got {type(record).__name__}", file=self.json_path, index=index
            )
        for field in REQUIRED_FIELDS:
            if field not in record:
                raise self._error(index, field, "missing")
        for field in ("height", "width"):
            if not is_positive_int(record[field]):
                raise self._error(index, field, f"expected a positive integer, got {record[field]!r}")
        questions, answers = record["questions"], record["answers"]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise self._error(index, "questions", "expected a list of strings")
        if not isinstance(answers, list) or len(answers) != len(questions):
            raise self._error(
                index, "answers", f"expected a list with one entry per question ({len(questions)})"
            )
        for q, targets in enumerate(answers):
            if not isinstance(targets, list) or not all(
                isinstance(t, dict) and "segmentation" in t for t in targets
            ):
                raise self._error(
                    index, f"answers[{q}]", "expected a list of annotations with 'segmentation'"
                )
            ids = [t["id"] for t in targets if "id" in t]
            if len(set(map(repr, ids))) != len(ids):
                raise self._error(index, f"answers[{q}]", f"annotation ids {ids} repeat a target")
        texts = record.get("text_answers")
        if texts is not None and (not isinstance(texts, list) or len(texts) != len(questions)):
            texts = None
        self.image_paths.append(self._candidates(index, record))
        for q, targets in enumerate(answers):
            text = texts[q] if texts is not None else None
            if not isinstance(text, str) or text.count(SEG_PLACEHOLDER) != len(targets):
                text = fallback_answer(targets)
                self.num_fallback_answers += 1
            self.items.append((index, q))
            self.answers.append(text)

    def __len__(self) -> int:
        return len(self.items)

    def text(self, i: int) -> tuple[str, str, int]:
        """Question, answer (with ``{seg}``) and target count of item ``i``; reads no image."""
        index, q = self.items[i]
        return self.question(i), self.answers[i], len(self.records[index]["answers"][q])

    def question(self, i: int, epoch: int = 0) -> str:
        """Item ``i``'s question in ``epoch``, wrapped in its drawn template if there are templates."""
        index, q = self.items[i]
        text = self.records[index]["questions"][q]
        if not self.question_templates:
            return text
        return wrap_sentence(self.question_templates, text, seeded_rng(self.seed, epoch, i))

    def _image_path(self, index: int) -> tuple[Path, str]:
        """The image file of record ``index`` and its path relative to its root."""
        tried = []
        for root, name in self.image_paths[index]:
            path = confined_path(root, name)
            if path.is_file():
                return path, name
            tried.append(str(path))
        raise self._error(
            index, "file_name", f"image not found; tried {tried}", "check data.init_args.image_root"
        )

    def __getitem__(self, i: int) -> Sample:
        return self.draw(i, 0)

    def draw(self, i: int, epoch: int) -> Sample:
        """Item ``i`` with the question template of ``epoch`` (``EpochConcatDataset``)."""
        index, q = self.items[i]
        record = self.records[index]
        height, width = int(record["height"]), int(record["width"])
        path, relative = self._image_path(index)
        try:
            image = open_rgb(path)
        except DataError as err:
            raise self._error(index, "file_name", f"{path}: {err.problem}", err.hint) from err
        if image.size != (width, height):
            rotated = image.info.get(EXIF_ORIENTATION_KEY, 1) != 1
            raise self._error(
                index,
                "height/width",
                f"{height}x{width} but {path} is {image.size[1]}x{image.size[0]}"
                + (" after its EXIF orientation" if rotated else ""),
                "the annotation must describe the image as displayed (EXIF orientation applied)"
                if rotated
                else None,
            )
        masks = []
        for t, ann in enumerate(record["answers"][q]):
            try:
                masks.append(decode_segmentation(ann["segmentation"], height, width))
            except DataError as err:
                field = f"answers[{q}][{t}].segmentation"
                raise self._error(index, field, err.problem, err.hint) from err
        stacked = (
            torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0, height, width), dtype=torch.uint8)
        )
        meta = {
            "dataset": "muse",
            "json": str(self.json_path),
            "record_index": index,
            "question_index": q,
            "file_name": relative,
            "targets": [target_description(a, m) for a, m in zip(record["answers"][q], masks, strict=True)],
        }
        return Sample(
            image=image,
            question=self.question(i, epoch),
            answer=self.answers[i],
            masks=stacked,
            meta=meta,
        )  # masks: (K, H, W) uint8
