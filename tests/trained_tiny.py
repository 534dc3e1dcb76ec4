"""A tiny PixelLM taught, in a few seconds, to answer with two targets, and its export.

Random weights almost never emit codebook tokens, so inference tests would see no masks. This
model memorises one answer with two targets for any image and question, so every inference path
has masks to write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixellm.data.collate import MuseCollator
from pixellm.data.sample import Sample
from pixellm.export import save_pretrained
from pixellm.export_command import preprocess_of

QUESTION = "segment the circle and the square."
ANSWER = "the circle {seg} and the square {seg}."  # two targets: the left and the right half
OTHER_QUESTION = "where is the red triangle?"  # not taught: a prompt of another length
MAX_NEW_TOKENS = 24  # the answer is 19 tokens with its end token
STEPS = 40
LOGIT_SCALE = 1000.0


def half_mask(side: str, height: int, width: int) -> torch.Tensor:
    """(H, W) uint8 mask of the left or right half."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    if side == "left":
        mask[:, : width // 2] = 1
    else:
        mask[:, width // 2 :] = 1
    return mask


def random_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    """A noise image of ``size`` (W, H) in ``mode``."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def training_samples(count: int) -> list[Sample]:
    samples = []
    for i in range(count):
        image = random_image(i, size=(32, 24 + 8 * (i % 2)))
        masks = torch.stack([half_mask(s, image.height, image.width) for s in ("left", "right")])
        samples.append(Sample(image=image, question=QUESTION, answer=ANSWER, masks=masks))
    return samples


def train_tiny(task, datamodule) -> None:
    """Teacher-force the answer text until greedy decoding reproduces it (one thread: 10x faster here).

    Only the text loss trains: the decoder keeps its random weights, whose masks differ from image
    to image (the mask losses would take minutes to make them meaningful).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    collate = MuseCollator(task.tokenizer, task.codebook.tokens, datamodule.template, datamodule.image_size)
    batch = collate(training_samples(4))
    optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    task.train()
    for _ in range(STEPS):
        ce, _ = task.teacher_forced(batch)
        optimizer.zero_grad()
        ce.backward()
        optimizer.step()
    # The random decoder's logits are ~1e-3 and positive everywhere. A zero-mean, scaled
    # hypernetwork output gives logits of both signs and |logit| >> 0: masks that vary per image.
    last = task.decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        last.weight.sub_(last.weight.mean(0, keepdim=True)).mul_(LOGIT_SCALE)
        last.bias.sub_(last.bias.mean()).mul_(LOGIT_SCALE)
    task.eval()
    torch.set_num_threads(threads)


def export_tiny(task, datamodule, model_config: dict, folder: Path) -> Path:
    """Write ``task`` as ``pixellm export`` would."""
    return save_pretrained(task, folder, model_config, preprocess_of(datamodule, task))
