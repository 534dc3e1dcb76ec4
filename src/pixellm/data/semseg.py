"""Semantic and part segmentation as multi-class queries: "segment the X, Y and Z" -> one mask each.

Two on-disk formats, one subclass each of ``SemanticSegDataset``:

- ``LabelMapSegDataset``: one label PNG per image (ADE20K, COCO-Stuff); a class-name file.
- ``CocoPartSegDataset``: a COCO-format JSON (PACO-LVIS, PASCAL-Part); names from ``categories``.

As released (``sem_seg_dataset.py``): per image, up to ``max_questions * max_targets`` of its
classes are drawn and dealt into up to ``max_questions`` questions (``group_targets``); templates as
``training_prompt``; a part "obj:part" is named "obj part" or "the part of the obj" at random.
Differences, on purpose: one mask per *class* (the union of its instances; the release asks for
PACO/PASCAL-Part instances one by one, so two instances of one class get the same name), and
unlabelled/ignored pixels are 255 in every mask (left out of loss and IoU) unless
``ignore_in_masks=False`` (release: they count as background).
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pixellm.data.coco_json import annotation_mask, load_coco
from pixellm.data.errors import DataError
from pixellm.data.loading import open_image, read_json, seeded_rng
from pixellm.data.muse import target_description
from pixellm.data.sample import Sample
from pixellm.data.seg_prompts import group_targets, training_prompt

IGNORE_VALUE = 255
ClassName = str | tuple[str, str]  # a class, or (object, part)


@dataclass
class Candidates:
    """The classes one image offers: ``names[i]`` and ``mask(i)`` (H, W) uint8 in {0, 1, 255}."""

    image: Image.Image
    names: list[ClassName]
    mask: Callable[[int], np.ndarray]
    meta: dict[str, Any]


def spoken_name(name: ClassName, rng: np.random.Generator) -> str:
    """A class name as text; (object, part) becomes "object part" or "the part of the object"."""
    if isinstance(name, str):
        return name
    obj, part = name
    return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"


class SemanticSegDataset(Dataset[Sample], ABC):
    """Multi-class questions over images with dense class labels; subclasses read the files.

    Items are (image, question slot) for ``max_questions`` slots per image; the deal of classes
    into questions is fixed by ``(seed, epoch, image)``, so the slots of an image ask for disjoint
    classes within an epoch (an image with fewer questions repeats them in its extra slots), and an
    image with more classes than one deal takes has others asked for in other epochs (``draw``;
    ``dataset[i]`` is epoch 0's).

    Args:
        dataset: Name written to ``meta["dataset"]``.
        max_questions: Most questions per image (release 3).
        max_targets: Most classes per question (release 3).
        seed: Seed of every random choice.
        ignore_in_masks: Unlabelled pixels are 255 in every mask (True) or 0 (False, release).
    """

    def __init__(
        self,
        dataset: str,
        max_questions: int = 3,
        max_targets: int = 3,
        seed: int = 0,
        ignore_in_masks: bool = True,
    ) -> None:
        if min(max_questions, max_targets) < 1:
            raise ValueError("max_questions and max_targets must be >= 1")
        self.dataset = dataset
        self.max_questions, self.max_targets = max_questions, max_targets
        self.seed = seed
        self.ignore_in_masks = ignore_in_masks

    @abstractmethod
    def num_images(self) -> int:
        """How many images the dataset holds."""

    @abstractmethod
    def candidates(self, position: int) -> Candidates:
        """The image at ``position`` and its classes."""

    def __len__(self) -> int:
        return self.num_images() * self.max_questions

    def __getitem__(self, index: int) -> Sample:
        return self.draw(index, 0)

    def draw(self, index: int, epoch: int) -> Sample:
        """Item ``index`` with the deal and templates of ``epoch`` (``EpochConcatDataset``)."""
        requested, slot = divmod(index, self.max_questions)
        position, found, tried = requested, self.candidates(requested), 1
        while not found.names and tried < self.num_images():  # as released: take another image
            warnings.warn(
                f"{found.meta['json']}: no labelled class; the next image is used", stacklevel=2
            )
            position, tried = (position + 1) % self.num_images(), tried + 1
            found = self.candidates(position)
        if not found.names:
            raise ValueError(f"{self.dataset}: no image has a labelled class")
        # Seeded by the requested image, so that a substitute's items differ from the substitute's own.
        groups = group_targets(
            len(found.names), self.max_questions, self.max_targets, seeded_rng(self.seed, epoch, requested)
        )
        chosen = groups[slot % len(groups)]
        rng = seeded_rng(self.seed, epoch, requested, slot + 1)
        names = [spoken_name(found.names[i], rng) for i in chosen]
        question, answer = training_prompt(names, rng)
        masks = [found.mask(i) for i in chosen]
        if not self.ignore_in_masks:
            masks = [np.where(m == IGNORE_VALUE, 0, m).astype(np.uint8) for m in masks]
        meta = {
            "dataset": self.dataset,
            "record_index": position,
            "question_index": slot,
            **found.meta,
            "targets": [
                target_description({"rephrased_name": n}, m == 1)
                for n, m in zip(names, masks, strict=True)
            ],
        }
        return Sample(found.image, question, answer, torch.from_numpy(np.stack(masks)), meta)


def load_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file of lines "name" or "id: name" (in file order)."""
    path = Path(path)
    if path.suffix == ".json":
        names = read_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: expected a JSON list of class names")
        return names
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [re.sub(r"^\d+\s*:\s*", "", line) for line in lines if line]


class LabelMapSegDataset(SemanticSegDataset):
    """Label PNGs (ADE20K, COCO-Stuff): pixel value v is class ``names[v + label_offset]``.

    Layout: ``<label_root>/<stem>.png`` (every PNG is an item) and
    ``<image_root>/<stem><image_suffix>``. ADE20K: ``label_offset=-1`` (0 is "other", ignored;
    LISA's ``ade20k_classes.json`` lists the 150 classes). COCO-Stuff: ``label_offset=1`` with
    LISA's ``cocostuff_classes.txt`` (its first line is "0: unlabeled") and
    ``ignore_names_containing="-"`` (the release ignores the "-other"/"-stuff"-style classes).
    Values whose index falls outside the list, and 255, are unlabelled.

    Args:
        image_root: Folder of the images.
        label_root: Folder of the label PNGs.
        class_file: JSON list or "id: name" text file of class names.
        label_offset: Index shift from pixel value to class-file position.
        ignore_names_containing: Classes whose name contains this text are unlabelled.
        image_suffix: Suffix of the image files.
        (the others as ``SemanticSegDataset``.)
    """

    def __init__(
        self,
        image_root: str,
        label_root: str,
        class_file: str,
        dataset: str = "ade20k",
        label_offset: int = 0,
        ignore_names_containing: str | None = None,
        image_suffix: str = ".jpg",
        max_questions: int = 3,
        max_targets: int = 3,
        seed: int = 0,
        ignore_in_masks: bool = True,
    ) -> None:
        super().__init__(dataset, max_questions, max_targets, seed, ignore_in_masks)
        self.image_root, self.label_root = Path(image_root), Path(label_root)
        names = load_class_names(class_file)
        self.class_names: dict[int, str] = {}  # pixel value -> name, for the usable classes
        for value in range(IGNORE_VALUE):
            position = value + label_offset
            if 0 <= position < len(names) and not (
                ignore_names_containing and ignore_names_containing in names[position]
            ):
                self.class_names[value] = names[position]
        self.label_files = sorted(p.name for p in self.label_root.glob("*.png"))
        if not self.label_files:
            raise FileNotFoundError(f"{self.label_root}: no .png label maps")
        self.image_suffix = image_suffix

    def num_images(self) -> int:
        return len(self.label_files)

    def candidates(self, position: int) -> Candidates:
        label_path = self.label_root / self.label_files[position]
        try:
            with Image.open(label_path) as label_image:
                label = np.array(label_image)
        except Exception as err:  # Pillow's decoders raise many types on malformed files
            raise DataError(f"not a readable label map ({type(err).__name__}: {err})", file=label_path) from err
        if label.ndim != 2:
            raise DataError(f"expected a single-channel label map, got shape {label.shape}", file=label_path)
        image_name = Path(self.label_files[position]).stem + self.image_suffix
        image = open_image(self.image_root, image_name, f"{label_path}: image", label.shape)
        values = [int(v) for v in np.unique(label) if int(v) in self.class_names]
        unlabelled = ~np.isin(label, values)

        def mask(i: int) -> np.ndarray:
            return np.where(unlabelled, IGNORE_VALUE, label == values[i]).astype(np.uint8)

        meta = {"json": str(label_path), "file_name": image_name, "class_values": values}
        return Candidates(image, [self.class_names[v] for v in values], mask, meta)


def category_name(name: str) -> ClassName:
    """LVIS/PACO/PASCAL-Part category name: "dog:leg" -> ("dog", "leg"); "_(...)" suffixes go,
    underscores become spaces ("trash_can_(bin)" -> "trash can")."""
    parts = [p.split("_(")[0].replace("_", " ").strip() for p in name.strip().split(":")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


class CocoPartSegDataset(SemanticSegDataset):
    """COCO-format JSON (PACO-LVIS, PASCAL-Part): one mask per category of an image.

    A category's mask is the union of the image's annotations of it (polygons, RLE, crowd).
    Images without annotations are left out (counted in a warning).

    Args:
        annotation_file: The COCO-format JSON (``paco_lvis_v1_train.json``, ``train.json``).
        image_root: Folder that ``image_prefix + file_name`` is relative to.
        image_prefix: Path put before each ``file_name`` (PASCAL-Part as released:
            ``"VOCdevkit/VOC2010/JPEGImages/"``).
        (the others as ``SemanticSegDataset``.)
    """

    def __init__(
        self,
        annotation_file: str,
        image_root: str,
        dataset: str = "paco_lvis",
        image_prefix: str = "",
        max_questions: int = 3,
        max_targets: int = 3,
        seed: int = 0,
        ignore_in_masks: bool = True,
    ) -> None:
        super().__init__(dataset, max_questions, max_targets, seed, ignore_in_masks)
        self.annotation_file = Path(annotation_file)
        self.image_root, self.image_prefix = Path(image_root), image_prefix
        self.coco = load_coco(self.annotation_file, categories=True)
        self.names = {
            c["id"]: category_name(str(c["name"])) for c in self.coco.dataset["categories"]
        }
        for ann in self.coco.dataset["annotations"]:
            if ann.get("category_id") not in self.names:
                raise ValueError(
                    f"{self.annotation_file}: annotation {ann['id']}: field 'category_id': "
                    f"{ann.get('category_id')!r} is not in 'categories'"
                )
        self.image_ids = [i for i in self.coco.getImgIds() if self.coco.imgToAnns[i]]
        skipped = len(self.coco.imgs) - len(self.image_ids)
        if skipped:
            warnings.warn(
                f"{self.annotation_file}: {skipped} images without annotations left out",
                stacklevel=2,
            )

    def num_images(self) -> int:
        return len(self.image_ids)

    def candidates(self, position: int) -> Candidates:
        info = self.coco.imgs[self.image_ids[position]]
        height, width = int(info["height"]), int(info["width"])
        where = f"{self.annotation_file}: image {info['id']}"
        relative = self.image_prefix + info["file_name"]
        image = open_image(
            self.image_root, relative, f"{where}: field 'file_name'", (height, width)
        )
        by_category: dict[int, list[dict[str, Any]]] = {}
        for ann in self.coco.imgToAnns[info["id"]]:
            by_category.setdefault(ann["category_id"], []).append(ann)
        categories = list(by_category)

        def mask(i: int) -> np.ndarray:
            parts = [
                annotation_mask(a, height, width, f"{where}: annotation {a['id']}")
                for a in by_category[categories[i]]
            ]
            return np.bitwise_or.reduce(parts, axis=0)

        meta = {
            "json": str(self.annotation_file),
            "file_name": relative,
            "image_id": info["id"],
            "category_ids": categories,
        }
        return Candidates(image, [self.names[c] for c in categories], mask, meta)
