"""Tests of the data modules: one real batch from a tiny generated shapes dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixellm.data.datamodule import MuseDataModule, ShapesDataModule
from pixellm.tokenizer import codebook_token_strings

KEYS = {
    "pixel_values",
    "input_ids",
    "attention_mask",
    "labels",
    "masks",
    "resized_sizes",
    "original_sizes",
    "padded",
    "questions",
    "answers",
    "meta",
}


def _module(cache: Path, **kwargs: object) -> ShapesDataModule:
    dm = ShapesDataModule(
        cache_dir=str(cache), num_train_images=12, num_val_images=4, batch_size=4, **kwargs
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shapes_batch_is_consistent(tmp_path: Path, num_workers: int) -> None:
    dm = _module(tmp_path, num_workers=num_workers)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == KEYS
    b, t = batch["input_ids"].shape
    assert b == 4 and batch["attention_mask"].shape == batch["labels"].shape == (b, t)
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["original_sizes"].tolist() == [[64, 64]] * 4 == batch["resized_sizes"].tolist()
    codebook = torch.tensor(dm.tokenizer.convert_tokens_to_ids(codebook_token_strings(2, 3)))
    per_row = torch.isin(batch["labels"], codebook).sum(1)
    assert per_row.tolist() == [6 * m.shape[0] for m in batch["masks"]]
    assert all(
        m.shape[1:] == (64, 64) and set(m.unique().tolist()) <= {0.0, 1.0} for m in batch["masks"]
    )
    predict = next(iter(dm.predict_dataloader()))
    assert set(predict) == KEYS - {"labels"} and (predict["attention_mask"][:, -1] == 1).all()
    val = next(iter(dm.val_dataloader()))
    assert "labels" in val and val["meta"][0]["record_index"] == 0


def test_shuffle_is_seeded_and_drops_the_last_batch(tmp_path: Path) -> None:
    dm = _module(tmp_path)
    first = [b["meta"] for b in dm.train_dataloader()]
    again = [b["meta"] for b in dm.train_dataloader()]
    assert first == again
    assert len(first) == len(dm.train_set) // 4
    other = _module(tmp_path, seed=1)
    assert [b["meta"] for b in other.train_dataloader()] != first


def test_muse_module_reads_the_generated_files(tmp_path: Path) -> None:
    shapes = _module(tmp_path)
    dm = MuseDataModule(
        shapes.train_json,
        shapes.val_json,
        shapes.image_root,
        tokenizer="shapes",
        image_size=32,
        template="llava_v1",
        val_batch_size=3,
    )
    dm.setup("predict")
    assert dm.train_set is None
    batch = next(iter(dm.predict_dataloader()))
    assert (
        batch["pixel_values"].shape == (3, 3, 32, 32)
        and batch["resized_sizes"].tolist() == [[32, 32]] * 3
    )
    prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert dm.tokenizer.decode(prompt).startswith("<s> A chat between")


def test_hyperparameters_rebuild_the_shapes_module(tmp_path: Path) -> None:
    dm = ShapesDataModule(cache_dir=str(tmp_path), num_train_images=3, num_val_images=1)
    assert "train_json" not in dm.hparams
    assert ShapesDataModule(**dm.hparams).train_json == dm.train_json


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # no GPU here
def test_muse_module_options_reach_the_loaders(tmp_path: Path) -> None:
    shapes = _module(tmp_path)
    dm = MuseDataModule(
        shapes.train_json,
        shapes.val_json,
        [str(tmp_path / "elsewhere"), shapes.image_root],  # roots tried in order
        tokenizer="shapes",
        template="plain",
        batch_size=4,
        pin_memory=True,
        max_length=20,
        image_length=4,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory and loader.drop_last
    assert loader.collate_fn.encoder.max_length == 20 and loader.collate_fn.encoder.image_length == 4
    with pytest.warns(UserWarning, match="max_length=20 truncation so far"):
        batch = next(iter(loader))
    assert batch["input_ids"].shape[1] <= 20 - 3  # the image takes 4 of the 20 positions
    codebook = torch.tensor(dm.tokenizer.convert_tokens_to_ids(codebook_token_strings(2, 3)))
    assert torch.isin(batch["labels"], codebook).sum(1).tolist() == [6 * m.shape[0] for m in batch["masks"]]
    dm.setup("validate")  # evaluation is never cut: every ground-truth target keeps its codebook tokens
    batch = next(iter(dm.val_dataloader()))
    assert torch.isin(batch["labels"], codebook).sum(1).tolist() == [6 * m.shape[0] for m in batch["masks"]]
    assert [m.shape[0] for m in batch["masks"]] == [dm.val_set[i].masks.shape[0] for i in range(len(batch["masks"]))]
    assert batch["input_ids"].shape[1] > 20 - 3
    with pytest.raises(ValueError, match="unknown conversation template"):
        MuseDataModule(shapes.train_json, shapes.val_json, shapes.image_root, tokenizer="shapes", template="vicuna")


@pytest.mark.parametrize("world_size", [1, 2, 4, 12])
def test_evaluation_shards_every_question_once_and_evens_out_the_processes(tmp_path: Path, world_size: int) -> None:
    """Under DDP/FSDP each process takes every world-size-th question and all run the same number of
    batches (FSDP gathers weights in every forward); the repeats that even them out are marked, so
    nothing is scored twice."""
    from types import SimpleNamespace

    from pixellm.data.eval_sharding import is_repeat

    dm = _module(tmp_path, val_batch_size=2)
    every = [(m["record_index"], m["question_index"]) for b in dm.val_dataloader() for m in b["meta"]]
    assert len(every) == 9  # 4 images, divisible by none of 2, 4, 12
    scored, batches = [], set()
    for rank in range(world_size):
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        metas = [b["meta"] for b in dm.val_dataloader()]
        batches.add(len(metas))
        questions = [((m["record_index"], m["question_index"]), is_repeat(m)) for ms in metas for m in ms]
        assert len(questions) == -(-9 // world_size)  # the same share everywhere
        assert [q for q, repeat in questions if not repeat] == every[rank::world_size]
        scored += [q for q, repeat in questions if not repeat]
    assert len(batches) == 1 and sorted(scored) == sorted(every)
