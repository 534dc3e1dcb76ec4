"""Fixtures of the dataset tests: one training step of the tiny model on a list of samples."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch

from pixellm.data.collate import MuseCollator
from pixellm.data.sample import Sample
from pixellm.tokenizer import codebook_token_strings, load_tokenizer

CODEBOOK = codebook_token_strings(2, 3)


@pytest.fixture(scope="session")
def train_step(tiny_config, build) -> Callable[[list[Sample]], float]:
    """``train_step(samples)``: collate them and run ``task.training_step`` of the tiny model
    once (with backward); returns the loss after checking it is finite."""
    torch.manual_seed(0)
    task, _ = build(tiny_config)
    task.train()
    collate = MuseCollator(load_tokenizer("shapes", CODEBOOK), CODEBOOK, "plain", 32)

    def step(samples: list[Sample]) -> float:
        batch = collate(samples)
        with warnings.catch_warnings():  # self.log outside a Trainer only warns
            warnings.filterwarnings("ignore", message=".*self.log.*")
            loss = task.training_step(batch, 0)
        loss.backward()
        task.zero_grad()
        value = float(loss.detach())
        assert math.isfinite(value), value
        return value

    return step
