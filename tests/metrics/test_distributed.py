"""The metric states reduce across processes: 2 CPU processes on gloo == 1 process on all data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pixellm.metrics.iou import PairedMaskIoU


def pairs_of_rank(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A different, fixed set of pairs per rank, with few- and many-target questions and judge weights."""
    generator = torch.Generator().manual_seed(rank)
    union = torch.randint(1, 50, (7,), generator=generator).double()
    inter = torch.floor(union * torch.rand(7, generator=generator, dtype=torch.float64))
    num_targets = torch.tensor([1, 2, 2, 5, 5, 5, 5]) + rank
    score = torch.rand(7, generator=generator, dtype=torch.float64)
    return inter, union, num_targets, score


def scores_as_floats(metric: PairedMaskIoU) -> dict[str, float]:
    return {name: float(value) for name, value in metric.compute().items()}


def run_rank(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    metric = PairedMaskIoU()
    metric.update(*pairs_of_rank(rank))
    Path(out, f"rank{rank}.json").write_text(json.dumps(scores_as_floats(metric)))
    dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_gloo_processes_reduce_to_the_single_process_result(tmp_path):
    # fork: the children inherit the imported torchmetrics instead of importing it again (slow)
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(run_rank, args=args, nprocs=2, join=True, start_method="fork")
    single = PairedMaskIoU()
    for rank in range(2):
        single.update(*pairs_of_rank(rank))
    expected = scores_as_floats(single)
    alone = PairedMaskIoU()
    alone.update(*pairs_of_rank(0))
    assert scores_as_floats(alone) != expected  # rank 0 alone differs: the test can fail
    for rank in range(2):
        reduced = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert reduced.keys() == expected.keys()
        for name, value in expected.items():
            assert reduced[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name
