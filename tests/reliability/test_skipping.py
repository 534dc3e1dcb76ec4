"""Skipping bad samples: counted across worker processes, summarised, limited, never misaligned."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from muse_files import H, W, record, write_dataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pixellm.data.datamodule import MuseDataModule
from pixellm.data.errors import DataError
from pixellm.data.sample import Sample
from pixellm.reliability.skipping import (
    SkipBadSamples,
    SkipFilteringCollate,
    SkipLimitExceeded,
    SkippedSample,
    SkippedSamplesReport,
    is_empty_batch,
)


class Numbered(Dataset):
    """Item i: a 1x2x2 mask filled with i and meta {"i": i}; listed items raise DataError."""

    def __init__(self, size: int, bad: set[int], refused_by_collate: set[int] = frozenset()) -> None:
        self.size, self.bad, self.refused = size, bad, refused_by_collate

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if i in self.bad:
            raise DataError("broken", file="n.json", index=i, field="segmentation")
        return Sample(Image.new("RGB", (2, 2)), "q", "a", torch.full((1, 2, 2), i), {"i": i})


def collate(samples: list[Sample]) -> dict[str, Any]:
    if any(s.meta["i"] % 10 == 7 for s in samples):
        raise DataError(f"text of item {[s.meta['i'] for s in samples]} refused")
    return {"masks": [s.masks for s in samples], "meta": [s.meta for s in samples]}


def test_skips_travel_with_the_batch_from_worker_processes() -> None:
    loader = DataLoader(
        SkipBadSamples(Numbered(12, bad={1, 5, 6})),
        batch_size=4,
        num_workers=2,
        collate_fn=SkipFilteringCollate(collate),
    )
    batches = list(loader)
    kept = [m["i"] for b in batches for m in b["meta"]]
    assert kept == [0, 2, 3, 4, 8, 9, 10, 11]  # 7 refused by collate, 1, 5, 6 by the dataset
    for b in batches:  # every mask still belongs to its own sample
        assert [int(m.flatten()[0]) for m in b["masks"]] == [m["i"] for m in b["meta"]]
    skipped = [s for b in batches for s in b.get("skipped", [])]
    assert [s.index for s in skipped] == [1, 5, 6, None]
    assert skipped[0].reason == "n.json: record 1: field 'segmentation': broken"
    assert skipped[3].reason == "text of item [7] refused"


def test_a_batch_of_only_bad_samples_is_empty() -> None:
    with pytest.warns(UserWarning, match=r"^skipping bad sample\(s\), first: bad$"):
        batch = SkipFilteringCollate(collate)([SkippedSample(3, "bad"), SkippedSample(4, "bad")])
    assert batch == {"meta": [], "skipped": [SkippedSample(3, "bad"), SkippedSample(4, "bad")]}
    assert is_empty_batch(batch) and not is_empty_batch({"meta": [{}], "skipped": []})
    assert "skipped" not in SkipFilteringCollate(collate)([Numbered(1, set())[0]])


def test_other_exceptions_are_bugs_and_propagate() -> None:
    class Buggy(Numbered):
        def __getitem__(self, i: int) -> Sample:
            raise KeyError("a bug, not bad data")

    with pytest.raises(KeyError, match="a bug"):
        SkipBadSamples(Buggy(2, set()))[0]


def _feed(report: SkippedSamplesReport, trainer: Any, batches: list[dict]) -> None:
    for i, batch in enumerate(batches):
        report.on_train_batch_start(trainer, None, batch, i)
    report.on_train_epoch_end(trainer, None)


def _batch(used: int, skipped: int) -> dict:
    return {"meta": [{}] * used, "skipped": [SkippedSample(i, f"bad {i}") for i in range(skipped)]}


def test_epoch_summary_counts_and_quotes_reasons() -> None:
    trainer = SimpleNamespace(num_training_batches=3, current_epoch=2)
    report = SkippedSamplesReport(max_skipped_fraction=0.2)
    with pytest.warns(UserWarning) as caught:
        _feed(report, trainer, [_batch(4, 0), _batch(3, 1), _batch(4, 0)])
    assert str(caught[0].message) == (
        "train epoch 2: skipped 1 of 12 samples (8.33 %); first reasons:\n  bad 0"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _feed(report, trainer, [_batch(4, 0)] * 3)  # a clean epoch: counts restart, no warning


def test_limit_stops_the_run_with_the_summary() -> None:
    trainer = SimpleNamespace(num_training_batches=3, current_epoch=0)
    report = SkippedSamplesReport(0.1)  # evaluation: at the end of the epoch
    for i, batch in enumerate([_batch(4, 0), _batch(2, 2), _batch(4, 0)]):
        report.on_validation_batch_start(trainer, None, batch, i)
    with pytest.raises(
        SkipLimitExceeded,
        match=r"^val epoch 0: skipped 2 of 12 samples \(16\.67 %\); first reasons:\n  bad 0\n  bad 1\n"
        r"more than 10\.00% skipped$",
    ):
        report.on_validation_epoch_end(trainer, None)
    # training: within the epoch as soon as the skips alone exceed the limit of its ~12 samples
    report = SkippedSamplesReport(0.1)
    report.on_train_batch_start(trainer, None, _batch(3, 1), 0)
    with pytest.raises(SkipLimitExceeded, match=r"already more than 10\.00% of the epoch's ~12 samples"):
        report.on_train_batch_start(trainer, None, _batch(3, 1), 1)


def module_with_a_bad_image(tmp_path: Path, count: int, bad: int, **options: Any) -> MuseDataModule:
    """A MuseDataModule over ``count`` one-question records whose image ``bad`` is not a readable image
    (train and val read the same file)."""
    records = [record(file_name=f"{i}.png") for i in range(count)]
    images = {f"{i}.png": Image.new("RGB", (W, H), (30 * i, 0, 0)) for i in range(count)}
    path = write_dataset(tmp_path, records, images)
    (tmp_path / "images" / f"{bad}.png").write_bytes(b"\x89PNG broken")
    return MuseDataModule(
        str(path), str(path), str(tmp_path / "images"), tokenizer="shapes", image_size=32, template="plain", **options
    )


def test_datamodule_loaders_skip_and_count_a_bad_image(tmp_path: Path) -> None:
    data = module_with_a_bad_image(tmp_path, 6, 3, batch_size=3, val_batch_size=3)
    data.setup("fit")
    with pytest.warns(UserWarning, match=r"skipping bad sample\(s\), first: .*record 3: field 'file_name'"):
        batches = list(data.val_dataloader())
    assert [m["record_index"] for b in batches for m in b["meta"]] == [0, 1, 2, 4, 5]
    assert [len(b.get("skipped", [])) for b in batches] == [0, 1]
    assert "3.png: not a readable image" in batches[1]["skipped"][0].reason
    assert all(len(b["masks"]) == len(b["meta"]) == b["pixel_values"].shape[0] for b in batches)


def test_fit_skips_a_bad_image_and_reports_or_stops(tmp_path: Path, tiny_config, build) -> None:
    from lightning import Trainer

    task, _ = build(tiny_config)
    data = module_with_a_bad_image(tmp_path, 8, 5, batch_size=4, val_batch_size=4)

    def fit(report: SkippedSamplesReport) -> Trainer:
        trainer = Trainer(
            max_epochs=1, callbacks=[report], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )
        trainer.fit(task, data)
        return trainer

    with pytest.warns(UserWarning, match=r"train epoch 0: skipped 1 of 8 samples \(12\.50 %\); first reasons:\n  .*record 5: field 'file_name': .*5\.png: not a readable image"):
        assert fit(SkippedSamplesReport(max_skipped_fraction=0.2)).global_step == 2
    with pytest.raises(SkipLimitExceeded, match=r"skipped 1 of \d samples"):
        fit(SkippedSamplesReport(max_skipped_fraction=0.1))


def test_evaluation_report_passes_over_a_batch_of_only_bad_samples(tmp_path: Path, tiny_config, build) -> None:
    """At evaluation batch size 1, a bad sample makes a batch with no samples: the report skips it."""
    from lightning import Trainer

    from pixellm.callbacks import EvaluationReport

    task, _ = build(tiny_config)
    data = module_with_a_bad_image(tmp_path, 4, 2, batch_size=1, val_batch_size=1, eval_mode="generate")
    report = EvaluationReport(output_dir=str(tmp_path / "eval"))
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[report])
    with pytest.warns(UserWarning, match=r"skipping bad sample\(s\), first: .*record 2: field 'file_name'"):
        trainer.validate(task, data)
    saved = json.loads((tmp_path / "eval" / "val_step0" / "val.json").read_text())
    assert [q["source"]["record_index"] for q in saved["questions"]] == [0, 1, 3]


class NamedCollate:
    """A collate function with an attribute (module level, so it pickles)."""

    mode = "train"

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        return collate(samples)


def test_the_wrapper_shows_the_collate_functions_attributes_and_pickles() -> None:
    import pickle

    wrapped = SkipFilteringCollate(NamedCollate())
    assert wrapped.mode == "train"
    assert pickle.loads(pickle.dumps(wrapped)).mode == "train"
