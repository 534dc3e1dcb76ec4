"""Visual question answering from LLaVA-Instruct-150k conversations: text answers, no masks.

On disk::

    <json_path>    [{"id": ..., "image": "000000033471.jpg",
                     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
                                       {"from": "gpt", "value": "..."}, ...]}, ...]
    <image_root>/<image>    COCO train2017 images

Turns alternate human/gpt, starting with the human. The ``<image>`` marker is removed (the
conversation template places the image token); the last exchange becomes ``question``/``answer``
and the earlier ones ``history``. A record whose text holds the literal ``{seg}`` would turn into
codebook tokens: such records are left out and counted in one warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pixellm.data.conversation import SEG_PLACEHOLDER
from pixellm.data.loading import open_image, read_json
from pixellm.data.sample import Sample
from pixellm.tokenizer import IMAGE_TOKEN

ROLES = ("human", "gpt")


def _turn_text(turn: Any, role: str, where: str) -> str:
    """The text of one checked turn, without image markers."""
    if not isinstance(turn, dict) or turn.get("from") != role:
        found = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
        raise ValueError(f"{where}.from: expected {role!r}, got {found!r}")
    if not isinstance(turn.get("value"), str):
        raise ValueError(f"{where}.value: expected a string")
    return turn["value"].replace(IMAGE_TOKEN, "").strip()


class VQADataset(Dataset[Sample]):
    """One item per LLaVA-Instruct conversation; K = 0 masks.

    Args:
        json_path: The conversations file (e.g. ``llava_instruct_150k.json``).
        image_root: Folder the records' ``image`` is relative to (COCO train2017).
        dataset: Name written to ``meta["dataset"]``.

    Attributes:
        num_skipped: Records left out because their text holds ``{seg}``.

    Raises:
        ValueError: On a record without ``image``/``conversations`` or with turns out of order,
            naming the file, record index and field.
    """

    def __init__(
        self, json_path: str, image_root: str, dataset: str = "llava_instruct_150k"
    ) -> None:
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        self.dataset = dataset
        records = read_json(self.json_path)
        if not isinstance(records, list):
            raise ValueError(f"{self.json_path}: expected a JSON list of records")
        self.items: list[tuple[int, str, list[tuple[str, str]]]] = []  # record, image, turns
        self.records = records
        self.num_skipped = 0
        for index, record in enumerate(records):
            where = f"{self.json_path}: record {index}: field"
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{where} 'image': expected a string")
            turns = record.get("conversations")
            if not isinstance(turns, list) or not turns or len(turns) % 2:
                raise ValueError(
                    f"{where} 'conversations': expected a non-empty list of human/gpt pairs"
                )
            texts = [
                _turn_text(t, ROLES[i % 2], f"{where} 'conversations[{i}]'")
                for i, t in enumerate(turns)
            ]
            if any(SEG_PLACEHOLDER in t for t in texts):
                self.num_skipped += 1
                continue
            self.items.append(
                (index, record["image"], list(zip(texts[::2], texts[1::2], strict=True)))
            )
        if self.num_skipped:
            warnings.warn(
                f"{self.json_path}: {self.num_skipped} of {len(records)} records hold the literal "
                f"{SEG_PLACEHOLDER} and were left out",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        record_index, image_name, exchanges = self.items[index]
        where = f"{self.json_path}: record {record_index}: field 'image'"
        image = open_image(self.image_root, image_name, where)
        question, answer = exchanges[-1]
        meta = {
            "dataset": self.dataset,
            "json": str(self.json_path),
            "record_index": record_index,
            "question_index": len(exchanges) - 1,
            "file_name": image_name,
            "id": self.records[record_index].get("id"),
            "targets": [],
        }
        masks = torch.zeros((0, image.height, image.width), dtype=torch.uint8)  # (0, H, W)
        return Sample(image, question, answer, masks, meta, history=exchanges[:-1])
