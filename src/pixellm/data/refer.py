"""refCOCO / refCOCO+ / refCOCOg / refCLEF in the REFER layout: single- and multi-referring.

On disk (as the REFER API and the release expect)::

    <root>/<dataset>/instances.json          COCO-format images, annotations, categories
    <root>/<dataset>/refs(<split_by>).p      refs pickle (or refs(<split_by>).json, see below)
    <image_root>/<file_name>                 COCO train2014 (refcoco*) or saiapr_tc-12 (refclef)

``split_by`` defaults as in the release: ``umd`` for refcocog, ``unc`` otherwise. A
``refs(<split_by>).json`` written by ``pixellm convert-refs`` is preferred over the pickle when
both exist; the pickle is read with a restricted unpickler (``pixellm.data.refs_file``).

Sentences are stripped and lower-cased (as the release's evaluation does); masks come from each
ref's annotation, decoded with pycocotools; every random choice comes from ``(seed, index)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from pixellm.data.coco_json import annotation_mask, load_coco
from pixellm.data.loading import open_image, seeded_rng
from pixellm.data.muse import target_description
from pixellm.data.refs_file import convert_refs_command, load_refs
from pixellm.data.sample import Sample
from pixellm.data.seg_prompts import (
    EVAL_QUESTION,
    PAPER_MULTI_QUESTION,
    eval_prompt,
    group_targets,
    training_prompt,
)

__all__ = ["MultiReferDataset", "ReferDataset", "convert_refs_command"]

DEFAULT_SPLIT_BY = {"refcocog": "umd"}  # release; every other dataset: "unc"
EVAL_GROUP_SIZES = (6, 5, 4)  # release ValDataset: consecutive sentences in cycles of 6, 5, 4


def refs_path(root: Path, dataset: str, split_by: str) -> Path:
    """``refs(<split_by>).json`` when it exists, else ``refs(<split_by>).p``."""
    converted = root / dataset / f"refs({split_by}).json"
    return converted if converted.is_file() else root / dataset / f"refs({split_by}).p"


class ReferDatasetBase(Dataset[Sample], ABC):
    """The refs of one split, indexed by image; the datasets below choose what an item is.

    Args:
        root: Folder holding ``<dataset>/instances.json`` and the refs file.
        dataset: "refcoco", "refcoco+", "refcocog" or "refclef".
        split: The refs' split: "train", "val", "testA", "testB", "test".
        image_root: Folder the images' ``file_name`` is relative to.
        split_by: Refs partition ("unc", "google", "umd"); default "umd" for refcocog, else "unc".
        refs_file: Explicit refs file (``.p`` or ``.json``); default ``refs_path``.
        seed: Seed of every random choice (templates, target subsets).
        train: Training items with random templates (True) or evaluation items (False).
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        split: str,
        image_root: str,
        split_by: str | None = None,
        refs_file: str | None = None,
        seed: int = 0,
        train: bool = False,
    ) -> None:
        self.dataset = dataset
        self.train = train
        self.split = split
        self.image_root = Path(image_root)
        self.seed = seed
        split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        self.refs_file = Path(refs_file) if refs_file else refs_path(Path(root), dataset, split_by)
        self.coco = load_coco(Path(root) / dataset / "instances.json")
        self.refs = load_refs(self.refs_file)
        # per image (in order of first appearance): (ref index, sentence index) of every sentence
        self.image_sentences: dict[int, list[tuple[int, int]]] = {}
        for index, ref in enumerate(self.refs):
            if ref["split"] != split:
                continue
            for field, table in (("ann_id", self.coco.anns), ("image_id", self.coco.imgs)):
                if ref[field] not in table:
                    raise ValueError(
                        f"{self.refs_file}: ref {index}: field {field!r}: {ref[field]} is not in "
                        f"{Path(root) / dataset / 'instances.json'}"
                    )
            sentences = self.image_sentences.setdefault(ref["image_id"], [])
            sentences.extend((index, s) for s in range(len(ref["sentences"])))
        self.image_ids = list(self.image_sentences)
        if not self.image_ids:
            raise ValueError(f"{self.refs_file}: no ref of split {split!r}")
        self.items = self.build_items()

    @abstractmethod
    def build_items(self) -> list[Any]:
        """What each index of the dataset stands for."""

    def __len__(self) -> int:
        return len(self.items)

    def sentence(self, ref_index: int, sent_index: int) -> str:
        """Sentence ``sent_index`` of ref ``ref_index``, stripped and lower-cased."""
        return self.refs[ref_index]["sentences"][sent_index]["sent"].strip().lower()

    def _sample(
        self,
        image_id: int,
        sentences: list[tuple[int, int]],
        question: str,
        answer: str,
        meta: dict[str, Any],
    ) -> Sample:
        """The sample whose targets are the refs of ``sentences`` (ref index, sentence index)."""
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        where = f"{self.refs_file}: image {image_id}"
        image = open_image(
            self.image_root, info["file_name"], f"{where}: field 'file_name'", (height, width)
        )
        masks, targets = [], []
        for ref_index, sent_index in sentences:
            ann = self.coco.anns[self.refs[ref_index]["ann_id"]]
            mask = annotation_mask(
                ann, height, width, f"{where}: ref {ref_index}: annotation {ann['id']}"
            )
            masks.append(mask)
            description = {
                "rephrased_name": self.sentence(ref_index, sent_index),
                "bbox": ann.get("bbox"),
            }
            targets.append(target_description(description, mask))
        meta.update(
            dataset=self.dataset,
            json=str(self.refs_file),
            file_name=info["file_name"],
            image_id=image_id,
            ref_ids=[self.refs[r]["ref_id"] for r, _ in sentences],
            targets=targets,
        )
        return Sample(
            image=image,
            question=question,
            answer=answer,
            masks=torch.from_numpy(np.stack(masks)),
            meta=meta,
        )


class ReferDataset(ReferDatasetBase):
    """Classic single-target referring segmentation: one item per sentence, one mask.

    Training items draw a question template (SHORT_QUESTIONS) and answer template (ANSWERS)
    from ``(seed, epoch, index)``, anew each epoch as the release draws at every read (``draw``;
    ``dataset[i]`` is epoch 0's); evaluation items use the release's fixed prompt "What is
    <sentence> in this image? Please output segmentation mask." with the answer "{seg}.".

    Args: as ``ReferDatasetBase``.
    """

    def build_items(self) -> list[tuple[int, int]]:
        """(ref index, sentence index) of every sentence of the split."""
        return [pair for image_id in self.image_ids for pair in self.image_sentences[image_id]]

    def __getitem__(self, index: int) -> Sample:
        return self.draw(index, 0)

    def draw(self, index: int, epoch: int) -> Sample:
        """Item ``index`` with the templates of ``epoch`` (``EpochConcatDataset``)."""
        ref_index, sent_index = self.items[index]
        sentence = self.sentence(ref_index, sent_index)
        if self.train:
            question, answer = training_prompt([sentence], seeded_rng(self.seed, epoch, index))
        else:
            question, answer = eval_prompt([sentence])
        meta = {"record_index": ref_index, "question_index": sent_index}
        return self._sample(
            self.refs[ref_index]["image_id"], [(ref_index, sent_index)], question, answer, meta
        )


class MultiReferDataset(ReferDatasetBase):
    """Multi-referring segmentation (Sec. 5.1): "segment the <a>, <b> and <c>", masks in order.

    Training (as released, ``allocate_class``): per image, up to ``max_questions *
    max_targets`` of its sentences are drawn and dealt into up to ``max_questions`` questions of
    up to ``max_targets`` targets; the deal is fixed by ``(seed, epoch, image)``, so the questions of
    an image (one item each) never share a drawn sentence within an epoch, and an image with more
    sentences than one deal takes has others drawn in other epochs (``draw``; ``dataset[i]`` is
    epoch 0's). Templates as ``training_prompt``.

    Evaluation (as the release's ValDataset with ``multi`` data): per image, its sentences in refs
    order are cut into consecutive groups whose sizes cycle through ``group_sizes`` (6, 5, 4, 6,
    ...), restarting at each image; the last group holds what is left (so it may have 1-5
    sentences). Two sentences of one ref in a group give two equal masks, as released. The
    question is the paper's "Please segment the <a>, <b> and <c>." (``eval_prompt="paper"``) or
    the release's "What is <a>, <b> and <c> in this image? Please output segmentation mask."
    (``"release"``); the answer is "{seg}, {seg} and {seg}.".

    Args:
        max_questions: Training: most questions per image (release 3).
        max_targets: Training: most targets per question (release 3).
        group_sizes: Evaluation: the cycle of group sizes (release 6, 5, 4).
        eval_prompt: Evaluation question: "paper" or "release".
        (the others as ``ReferDatasetBase``; ``train`` picks training items or evaluation groups.)
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        split: str,
        image_root: str,
        split_by: str | None = None,
        refs_file: str | None = None,
        seed: int = 0,
        train: bool = False,
        max_questions: int = 3,
        max_targets: int = 3,
        group_sizes: tuple[int, ...] = EVAL_GROUP_SIZES,
        eval_prompt: Literal["paper", "release"] = "paper",
    ) -> None:
        if min(max_questions, max_targets, *group_sizes) < 1:
            raise ValueError("max_questions, max_targets and group_sizes must be >= 1")
        if eval_prompt not in ("paper", "release"):
            raise ValueError(f"eval_prompt must be 'paper' or 'release', got {eval_prompt!r}")
        self.max_questions, self.max_targets = max_questions, max_targets
        self.group_sizes = tuple(group_sizes)
        self.template = PAPER_MULTI_QUESTION if eval_prompt == "paper" else EVAL_QUESTION
        super().__init__(root, dataset, split, image_root, split_by, refs_file, seed, train)

    def build_items(self) -> list[tuple[int, Any]]:
        """Training: (image position, question); evaluation: (image position, sentence positions)."""
        items: list[tuple[int, Any]] = []
        for position, image_id in enumerate(self.image_ids):
            count = len(self.image_sentences[image_id])
            if self.train:
                items.extend((position, q) for q in range(min(self.max_questions, count)))
                continue
            start, cycle = 0, 0
            while start < count:
                size = self.group_sizes[cycle % len(self.group_sizes)]
                items.append((position, list(range(start, min(start + size, count)))))
                start, cycle = start + size, cycle + 1
        return items

    def __getitem__(self, index: int) -> Sample:
        return self.draw(index, 0)

    def draw(self, index: int, epoch: int) -> Sample:
        """Item ``index`` with the training deal and templates of ``epoch`` (``EpochConcatDataset``);
        evaluation items do not depend on the epoch."""
        position, choice = self.items[index]
        image_id = self.image_ids[position]
        sentences = self.image_sentences[image_id]
        if self.train:
            groups = group_targets(
                len(sentences),
                self.max_questions,
                self.max_targets,
                seeded_rng(self.seed, epoch, position),
            )
            chosen = [sentences[i] for i in groups[choice]]
            names = [self.sentence(*pair) for pair in chosen]
            question, answer = training_prompt(names, seeded_rng(self.seed, epoch, position, choice + 1))
            question_index = choice
        else:
            chosen = [sentences[i] for i in choice]
            question, answer = eval_prompt([self.sentence(*pair) for pair in chosen], self.template)
            question_index = index
        meta = {"record_index": position, "question_index": question_index}
        return self._sample(image_id, chosen, question, answer, meta)
