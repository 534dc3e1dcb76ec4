"""Training-loader throughput: samples/s with 0 vs N DataLoader workers, side by side in one run.

The data are generated MUSE-format files (the shapes generator of ``pixellm.data.shapes``, drawn at
``--image-size`` pixels, written as PNG) read by the real ``MuseDataModule``: PNG decoding, mask
decoding from polygons/RLE, resize to 448 + normalise + pad, LLaVA v1 template and tokenisation,
collation. Each setting runs two epochs; the first includes starting the worker processes.
Run: python benchmarks/loader.py [--images 120] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pixellm.data.datamodule import MuseDataModule, default_cache_dir
from pixellm.data.shapes import ensure_shapes_dataset


def epoch_rates(dm: MuseDataModule, epochs: int) -> list[float]:
    """Samples per second of each of ``epochs`` passes over the training loader."""
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch["masks"])
        rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=120, help="generated training images (2-3 questions each)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the generated images in pixels")
    parser.add_argument("--workers", type=int, default=2, help="worker processes compared with 0")
    parser.add_argument("--batch-size", type=int, default=2, help="questions per batch (release: 2 per GPU)")
    args = parser.parse_args()
    root = ensure_shapes_dataset(Path(default_cache_dir()) / "bench", 0, args.images, 1, args.image_size)
    settings = {}
    for workers in (0, args.workers):
        dm = MuseDataModule(
            str(root / "muse_train.json"),
            str(root / "muse_val.json"),
            str(root / "images"),
            tokenizer="shapes",
            image_size=448,
            template="llava_v1",
            batch_size=args.batch_size,
            num_workers=workers,
            pin_memory=False,
        )
        dm.setup("fit")
        settings[workers] = epoch_rates(dm, 2)
    samples = len(dm.train_set) // args.batch_size * args.batch_size
    print(f"MUSE-format loader, {samples} samples per epoch ({args.images} generated {args.image_size} px "
          f"PNG images), batch {args.batch_size}, 448 px input, {os.cpu_count()} CPU cores")
    print(f"{'workers':>8}{'epoch 1 samples/s':>20}{'epoch 2 samples/s':>20}")
    for workers, (first, second) in settings.items():
        print(f"{workers:>8}{first:>20.1f}{second:>20.1f}")
    base, other = settings[0][1], settings[args.workers][1]
    print(f"epoch 2 speed-up with {args.workers} workers: {other / base:.2f}x")


if __name__ == "__main__":
    main()
