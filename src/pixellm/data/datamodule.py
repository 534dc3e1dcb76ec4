"""LightningDataModules: the shared collate/loader settings, any MUSE-format dataset, and the
generated shapes dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from pixellm.data.collate import CollateMode, MuseCollator
from pixellm.data.eval_sharding import MarkedRepeatSampler, MarkRepeats
from pixellm.data.muse import ImageRoot, MuseDataset
from pixellm.data.preprocess import DEFAULT_PIXEL_MEAN, DEFAULT_PIXEL_STD
from pixellm.data.shapes import ensure_shapes_dataset, shapes_dataset_dir
from pixellm.data.splits import EvalMode, EvalSplit
from pixellm.reliability.resumable_loader import EpochShuffleSampler, ResumableDataLoader
from pixellm.reliability.skipping import SkipBadSamples, SkipFilteringCollate
from pixellm.tokenizer import codebook_token_strings, load_tokenizer

CACHE_ENV = "PIXELLM_CACHE"


class SampleDataModule(LightningDataModule):
    """What every pixellm data module shares: tokenizer, text and image preprocessing, loaders.

    Subclasses build the datasets (of ``pixellm.data.sample.Sample``) and choose the samplers.

    Args:
        tokenizer: ``"shapes"`` or a local tokenizer directory (see ``load_tokenizer``).
        num_scales: L, visual scales of the segmentation codebook.
        tokens_per_scale: N, codebook tokens per scale.
        image_size: Side of the square model input in pixels (release: 448).
        pixel_mean: RGB mean in 0-255 units (release: ImageNet/SAM's).
        pixel_std: RGB standard deviation in 0-255 units.
        template: Conversation template, "llava_v1", "llama_2", "plain" or "llava_v1_im_start_end".
        max_length: Longest training sequence in LLM positions (release ``model_max_length``:
            512); longer ones are cut at the end, dropping the masks of targets whose codebook
            tokens are cut (see ``TextEncoder``). Evaluation never truncates (as the release's
            inference), so every ground-truth target is scored.
        image_length: LLM positions the image occupies (release: 256 image tokens); 1 counts it
            as one token.
        batch_size: Training batch size (questions per step per device).
        val_batch_size: Validation/test/prediction batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Page-locked batches for faster host-to-GPU copies (default: when CUDA is
            available).
        seed: Seed of the training order.
    """

    def __init__(
        self,
        tokenizer: str,
        num_scales: int = 2,
        tokens_per_scale: int = 3,
        image_size: int = 448,
        pixel_mean: tuple[float, float, float] = DEFAULT_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = DEFAULT_PIXEL_STD,
        template: str = "llava_v1",
        max_length: int = 512,
        image_length: int = 1,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.codebook_tokens = codebook_token_strings(num_scales, tokens_per_scale)
        self.tokenizer = load_tokenizer(tokenizer, self.codebook_tokens)
        self.image_size, self.template = image_size, template
        self.max_length, self.image_length = max_length, image_length
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.collator("train")  # fail at construction on a bad template or tokenizer

    def collator(self, mode: CollateMode, truncate: bool = True) -> MuseCollator:
        """The collate function for ``mode`` ("train" or "generate"), cut at ``max_length`` if ``truncate``."""
        return MuseCollator(
            self.tokenizer,
            self.codebook_tokens,
            self.template,
            self.image_size,
            self.pixel_mean,
            self.pixel_std,
            mode,
            self.max_length if truncate else None,
            self.image_length,
        )

    def loader(
        self,
        dataset: Dataset | None,
        batch_size: int,
        mode: CollateMode,
        shuffle: bool = False,
        sampler: Sampler[int] | None = None,
        drop_last: bool | None = None,
        truncate: bool = True,
    ) -> DataLoader:
        """A DataLoader over ``dataset`` collated in ``mode``; ``shuffle`` is seeded by ``seed``,
        ``sampler`` (if given) fixes the order instead; both drop the last incomplete batch unless
        ``drop_last`` says otherwise; ``truncate``: cut sequences at ``max_length``.

        Raises:
            RuntimeError: If ``dataset`` is None (``setup`` was not called).
        """
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # bad samples are skipped and counted (pixellm.reliability.skipping); the shuffled order
        # is a function of (seed, epoch) and resumes mid-epoch (reliability.resumable_loader)
        if shuffle and sampler is None:
            sampler = EpochShuffleSampler(len(dataset), self.seed)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return ResumableDataLoader(
            SkipBadSamples(dataset),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=(shuffle or sampler is not None) if drop_last is None else drop_last,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=SkipFilteringCollate(self.collator(mode, truncate)),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def eval_loader(self, dataset: Dataset | None, mode: CollateMode) -> DataLoader:
        """Evaluation batches of ``val_batch_size`` in dataset order, every sample scored once and
        never truncated (a cut target would go unscored).

        With several processes, each takes every world-size-th sample, and all run the same number
        of batches (collectives in every forward, e.g. FSDP's, need that): the last ones are evened
        out with repeats that are marked and not scored (``pixellm.data.eval_sharding``).
        """
        sampler = None
        if dataset is not None and self.trainer is not None and self.trainer.world_size > 1:
            sampler = MarkedRepeatSampler(len(dataset), self.trainer.world_size, self.trainer.global_rank)
            dataset = MarkRepeats(dataset)
        return self.loader(dataset, self.val_batch_size, mode, sampler=sampler, drop_last=False, truncate=False)


class MuseDataModule(SampleDataModule):
    """Train/val/test/predict loaders over MUSE-format JSON files.

    Args:
        train_json: MUSE JSON of the training split.
        val_json: MUSE JSON of the validation split (also used for prediction).
        image_root: Where images are found (see ``MuseDataset``): one folder, a list of folders,
            or a mapping from COCO split (``train2014``, ``train2017``, ``val2017``) to folder.
        test_json: MUSE JSON of the test split for ``pixellm test`` (e.g. ``muse_test_less.json``).
        eval_mode: How val and test are evaluated: "teacher_forced" or "generate" (see
            ``EvalSplit``).
        kwargs: The arguments of ``SampleDataModule`` (``tokenizer``, ``image_size``, ...).
    """

    def __init__(
        self,
        train_json: str,
        val_json: str,
        image_root: ImageRoot,
        test_json: str | None = None,
        eval_mode: EvalMode = "teacher_forced",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.train_json, self.val_json, self.image_root = train_json, val_json, image_root
        self.test_json = test_json
        self.eval_mode = EvalSplit("val", eval_mode).mode
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the JSON files needed by ``stage`` (all of them when None)."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = MuseDataset(self.train_json, self.image_root)
        if stage in (None, "fit", "validate", "predict") and self.val_set is None:
            self.val_set = MuseDataset(self.val_json, self.image_root)
        if stage in (None, "test") and self.test_set is None:
            if self.test_json is None:
                raise ValueError(f"{type(self).__name__}: `pixellm test` needs data.init_args.test_json")
            self.test_set = MuseDataset(self.test_json, self.image_root)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) teacher-forced batches; the last incomplete batch is dropped."""
        return self.loader(self.train_set, self.batch_size, "train", shuffle=True)

    def eval_splits(self, stage: str) -> list[EvalSplit]:
        """One split per dataloader of ``stage`` ("val" or "test"), in dataloader order."""
        return [EvalSplit(stage, self.eval_mode)]

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order, collated for ``eval_mode``."""
        return self.eval_loader(self.val_set, self.eval_splits("val")[0].collate_mode)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order, collated for ``eval_mode``."""
        return self.eval_loader(self.test_set, self.eval_splits("test")[0].collate_mode)

    def predict_dataloader(self) -> DataLoader:
        """Validation set in generate mode: prompts only, left-padded, no labels."""
        return self.loader(self.val_set, self.val_batch_size, "generate")


def default_cache_dir() -> str:
    """``$PIXELLM_CACHE``, else ``~/.cache/pixellm``."""
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "pixellm")


class ShapesDataModule(MuseDataModule):
    """The generated shapes dataset (see ``pixellm.data.shapes``), built on first use.

    Args:
        cache_dir: Where datasets are generated (default ``$PIXELLM_CACHE``, else
            ``~/.cache/pixellm``).
        num_train_images: Generated training images (2-3 questions each).
        num_val_images: Generated validation images.
        data_seed: Seed of the generator.
        Other arguments: as ``MuseDataModule``; the defaults suit the tiny shapes models. Images are
            generated at ``image_size``, so the model sees them without resampling.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        num_train_images: int = 3000,
        num_val_images: int = 200,
        data_seed: int = 0,
        tokenizer: str = "shapes",
        num_scales: int = 2,
        tokens_per_scale: int = 3,
        image_size: int = 64,
        pixel_mean: tuple[float, float, float] = DEFAULT_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = DEFAULT_PIXEL_STD,
        template: str = "plain",
        max_length: int = 512,
        image_length: int = 1,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        eval_mode: EvalMode = "teacher_forced",
    ) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.num_train_images = num_train_images
        self.num_val_images = num_val_images
        self.data_seed = data_seed
        folder = shapes_dataset_dir(
            self.cache_dir, data_seed, num_train_images, num_val_images, image_size
        )
        super().__init__(
            train_json=str(folder / "muse_train.json"),
            val_json=str(folder / "muse_val.json"),
            test_json=str(folder / "muse_val.json"),  # the held-out split doubles as test split
            image_root=str(folder / "images"),
            tokenizer=tokenizer,
            num_scales=num_scales,
            tokens_per_scale=tokens_per_scale,
            image_size=image_size,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            template=template,
            max_length=max_length,
            image_length=image_length,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            eval_mode=eval_mode,
        )
        # Keep only this class's arguments (the JSON paths are derived): they rebuild it.
        self.save_hyperparameters(ignore=["train_json", "val_json", "test_json", "image_root"])

    def prepare_data(self) -> None:
        """Generate the dataset once (Lightning calls this on one process per node)."""
        ensure_shapes_dataset(
            self.cache_dir,
            self.data_seed,
            self.num_train_images,
            self.num_val_images,
            self.image_size,
        )

    def setup(self, stage: str | None = None) -> None:
        """Make sure the dataset exists (cheap when it does), then read its JSON files."""
        self.prepare_data()
        super().setup(stage)
