"""Random draws of a training batch as a function of (seed, epoch, batch index, process).

Dropout (LoRA's included) draws from torch's global generators. Lightning seeds them once, at the
start of a run, and a checkpoint does not hold their state, so a run resumed from a checkpoint would
draw the masks of the run's first steps again. Seeding them before every training batch from
(seed, epoch, batch index, process) instead makes each batch's draws the same whether the run was
interrupted or not, on one process or several, without storing generator states.
"""

from __future__ import annotations

import numpy as np
import torch


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, batch index, process)."""
    state = np.random.SeedSequence([seed % 2**64, epoch, batch_index, rank]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_batch(seed: int, epoch: int, batch_index: int, rank: int) -> None:
    """Seed torch's CPU and CUDA generators for one training batch (see the module doc)."""
    torch.manual_seed(batch_seed(seed, epoch, batch_index, rank))
