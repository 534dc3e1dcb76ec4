"""Tests of the training mixture: ratios, repeatability, named eval sets, one training step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from pixellm.data.mixture import (
    EpochConcatDataset,
    EvalSet,
    MixtureDataModule,
    MixtureGroup,
    MixtureSampler,
    MixtureSource,
    source_probabilities,
)
from pixellm.data.muse import MuseDataset
from pixellm.data.sample import Sample
from pixellm.data.shapes import ensure_shapes_dataset
from pixellm.tokenizer import codebook_token_strings


class Numbers(Dataset):
    """``n`` integers (the mixture only needs lengths and indices)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Chat(Dataset[Sample]):
    """VQA-like items: no masks, one earlier turn of history, in the shapes vocabulary."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> Sample:
        return Sample(
            image=Image.new("RGB", (32, 24), (200, 40, 40)),
            question="which shapes are red?",
            answer="the small red circle.",
            masks=torch.zeros(0, 24, 32, dtype=torch.uint8),
            meta={"dataset": "chat", "record_index": i},
            history=[("segment the red circle.", "there is no red circle.")],
        )


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), 0, 8, 4, 32)


def _groups() -> list[MixtureGroup]:
    """The release's rates 2 : 9 : 2 : 4, with sub-ratios 1 : 3 inside refer_seg."""
    return [
        MixtureGroup("sem_seg", 2, [MixtureSource(Numbers(5))]),
        MixtureGroup("refer_seg", 9, [MixtureSource(Numbers(7), 1), MixtureSource(Numbers(11), 3)]),
        MixtureGroup("vqa", 2, [MixtureSource(Numbers(3))]),
        MixtureGroup("muse", 4, [MixtureSource(Numbers(13))]),
    ]


def test_probabilities_multiply_group_and_sub_ratios() -> None:
    expected = [2 / 17, 9 / 17 * 1 / 4, 9 / 17 * 3 / 4, 2 / 17, 4 / 17]
    assert np.allclose(source_probabilities(_groups()), expected)
    with pytest.raises(ValueError, match="group 'vqa'"):
        source_probabilities([MixtureGroup("vqa", 1, [])])
    with pytest.raises(ValueError, match="group 'x': dataset 0 .* is empty"):
        source_probabilities([MixtureGroup("x", 1, [MixtureSource(Numbers(0))])])


def test_empirical_ratios_of_10k_draws_are_within_2_percent() -> None:
    groups = _groups()
    sizes = [5, 7, 11, 3, 13]
    sampler = MixtureSampler(sizes, source_probabilities(groups), 10_000, seed=0)
    indices = np.array(list(sampler))
    assert indices.shape == (10_000,) and indices.min() >= 0 and indices.max() < sum(sizes)
    source = np.searchsorted(np.cumsum(sizes), indices, side="right")  # which dataset
    counts = np.bincount(source, minlength=5) / 10_000
    group_share = [counts[0], counts[1] + counts[2], counts[3], counts[4]]
    assert np.allclose(group_share, [2 / 17, 9 / 17, 2 / 17, 4 / 17], atol=0.02)
    assert abs(counts[2] / (counts[1] + counts[2]) - 0.75) < 0.02  # sub-ratio 1 : 3
    items = Counter(indices[source == 4].tolist())  # within a dataset: every item, about evenly
    assert len(items) == 13 and max(items.values()) / min(items.values()) < 1.5


def test_order_depends_only_on_seed_and_epoch() -> None:
    probabilities = source_probabilities(_groups())

    def draw(seed: int, epoch: int) -> list[int]:
        sampler = MixtureSampler([5, 7, 11, 3, 13], probabilities, 50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(0, 0) == draw(0, 0) and draw(0, 1) == draw(0, 1)
    assert draw(0, 0) != draw(0, 1) and draw(0, 0) != draw(1, 0)
    sampler = MixtureSampler([5, 7, 11, 3, 13], probabilities, 50, 0)
    assert [list(sampler), list(sampler)] == [draw(0, 0), draw(0, 1)]  # passes advance the epoch


class Drawn(Numbers):
    """Items that depend on the epoch they are read in."""

    def draw(self, i: int, epoch: int) -> tuple[int, int]:
        return i, epoch


def test_keys_carry_the_epoch_to_datasets_that_draw_anew_each_epoch() -> None:
    data = EpochConcatDataset([Numbers(5), Drawn(7)])
    sampler = MixtureSampler([5, 7], [0.5, 0.5], 40, seed=0)
    for epoch in (0, 1, 2):
        keys = list(sampler)
        assert [k // 12 for k in keys] == [epoch] * 40  # key = epoch * 12 + index
        expected = [k % 12 if k % 12 < 5 else (k % 12 - 5, epoch) for k in keys]
        assert [data[k] for k in keys] == expected


def test_replicas_split_one_epoch_between_them() -> None:
    probabilities = source_probabilities(_groups())
    whole = list(MixtureSampler([5, 7, 11, 3, 13], probabilities, 10, 0))
    parts = [MixtureSampler([5, 7, 11, 3, 13], probabilities, 10, 0, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(p) for p in parts] == [5, 5] and isinstance(parts[0], DistributedSampler)
    assert list(parts[0]) == whole[0::2] and list(parts[1]) == whole[1::2]


def _module(shapes_dir: Path, **kwargs: object) -> MixtureDataModule:
    muse = MuseDataset(shapes_dir / "muse_train.json", shapes_dir / "images")
    val = MuseDataset(shapes_dir / "muse_val.json", shapes_dir / "images")
    options = dict(
        train=[MixtureGroup("muse", 4, [MixtureSource(muse)]), MixtureGroup("vqa", 2, [MixtureSource(Chat())])],
        val=[EvalSet("val", val), EvalSet("test_less", val, "generate")],
        tokenizer="shapes",
        samples_per_epoch=12,
        image_size=32,
        template="plain",
        batch_size=4,
    )
    options.update(kwargs)
    return MixtureDataModule(**options)


def test_worker_count_does_not_change_the_batches(shapes_dir: Path) -> None:
    orders = []
    for workers in (0, 2):
        dm = _module(shapes_dir, num_workers=workers, seed=3)
        loader = dm.train_dataloader()
        for _ in range(2):  # two epochs
            orders.append([[(m.get("dataset"), m["record_index"], m.get("question_index")) for m in b["meta"]] for b in loader])
        del loader  # stop the persistent workers here, not in a later test
    assert len(orders[0]) == 3 and all(len(b) == 4 for b in orders[0])
    assert orders[0] == orders[2] and orders[1] == orders[3]  # epoch by epoch, 0 or 2 workers
    assert orders[0] != orders[1]  # the second epoch is another draw


def test_eval_sets_are_named_and_collated_by_mode(shapes_dir: Path) -> None:
    dm = _module(shapes_dir, val_batch_size=2)
    splits = dm.eval_splits("val")
    assert [(s.name, s.mode) for s in splits] == [("val", "teacher_forced"), ("test_less", "generate")]
    assert dm.eval_splits("test") == []
    teacher, generate = (next(iter(loader)) for loader in dm.val_dataloader())
    assert "labels" in teacher and "labels" not in generate
    assert (teacher["attention_mask"][:, 0] == 1).all() and (generate["attention_mask"][:, -1] == 1).all()
    assert [m["record_index"] for m in generate["meta"]] == [0, 0]  # file order, no shuffle
    assert "labels" not in next(iter(dm.predict_dataloader()))
    with pytest.raises(ValueError, match="distinct names"):
        _module(shapes_dir, test=[EvalSet("a", Chat()), EvalSet("a", Chat())])


MUSE_MODULE_YAML = """
class_path: pixellm.data.mixture.MixtureDataModule
init_args:
  tokenizer: shapes
  image_size: 32
  template: plain
  batch_size: 4
  train:
    - name: muse
      ratio: 4
      datasets:
        - dataset:
            class_path: pixellm.data.muse.MuseDataset
            init_args: {{json_path: {root}/muse_train.json, image_root: {root}/images}}
"""  # then more train groups, or other init_args
MIXTURE_YAML = MUSE_MODULE_YAML + """    - name: vqa
      ratio: 2
      datasets:
        - dataset: {{class_path: {chat}}}
  samples_per_epoch: 16
  seed: 1
  val:
    - name: val
      dataset:
        class_path: pixellm.data.muse.MuseDataset
        init_args: {{json_path: {root}/muse_val.json, image_root: {root}/images}}
"""


def test_a_mixture_from_yaml_trains_the_tiny_model(
    shapes_dir: Path, build, tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # Chat by class_path
    config = tmp_path / "mixture.yaml"
    config.write_text(MIXTURE_YAML.format(root=shapes_dir, chat=f"{Chat.__module__}.Chat"))
    model, dm = build(tiny_config, f"--data={config}")
    assert isinstance(dm, MixtureDataModule) and [g.name for g in dm.groups] == ["muse", "vqa"]
    assert np.allclose(dm.probabilities, [4 / 6, 2 / 6]) and dm.eval_splits("val")[0].name == "val"
    batch = next(iter(dm.train_dataloader()))
    kinds = Counter(m.get("dataset") for m in batch["meta"])
    assert kinds["chat"] > 0 and kinds["muse"] > 0  # both a K=0 chat item and MUSE items
    codebook = torch.tensor(dm.tokenizer.convert_tokens_to_ids(codebook_token_strings(2, 3)))
    per_row = torch.isin(batch["labels"], codebook).sum(1)
    assert per_row.tolist() == [6 * m.shape[0] for m in batch["masks"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(3):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


POOLED_TEST_YAML = MUSE_MODULE_YAML + """  test:
    - name: test
      mode: generate
      dataset:
        class_path: torch.utils.data.ConcatDataset
        init_args:
          datasets:
            - class_path: pixellm.data.muse.MuseDataset
              init_args: {{json_path: {root}/muse_val.json, image_root: {root}/images}}
            - class_path: pixellm.data.muse.MuseDataset
              init_args: {{json_path: {root}/muse_train.json, image_root: {root}/images}}
"""


def test_one_test_split_pools_two_files_as_configs_muse_yaml_does(
    shapes_dir: Path, build, tiny_config: Path, tmp_path: Path
) -> None:
    """configs/muse.yaml's test split: MUSE test_less + test_many in one ConcatDataset, so one metric
    gives Table 1's few / many / overall."""
    config = tmp_path / "pooled.yaml"
    config.write_text(POOLED_TEST_YAML.format(root=shapes_dir))
    _, dm = build(tiny_config, f"--data={config}")
    assert [(s.name, s.mode) for s in dm.eval_splits("test")] == [("test", "generate")]
    (loader,) = dm.test_dataloader()
    files = [m["json"] for batch in loader for m in batch["meta"]]
    val, train = (len(MuseDataset(shapes_dir / f"muse_{s}.json", shapes_dir / "images")) for s in ("val", "train"))
    assert len(files) == len(loader.dataset) == val + train
    assert [Path(f).name for f in files] == ["muse_val.json"] * val + ["muse_train.json"] * train
