"""Training-step profile of the default run (configs/shapes.yaml): where a step's time goes.

Builds the task and data of ``configs/shapes.yaml`` with the real CLI parser, takes one training batch
(16 questions), and times ``--steps`` full steps, then profiles as many (forward, loss, backward, gradient clipping, AdamW)
with ``torch.profiler``. Each part's forward runs inside a ``record_function`` label; a backward op is
charged to the part whose forward op created it (the autograd sequence number links the two). Peak
memory is the highest running sum of the profiler's allocation events during a step (activations,
gradients, optimizer state; the weights allocated before are not counted).

Prints each part's share of the step (forward + backward), samples/s, and peak memory.
Run: python benchmarks/step.py [--steps 5] [pixellm CLI overrides, e.g. --data.init_args.batch_size=8]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from pixellm.task import PixelLMTask

CONFIG = Path(__file__).parents[1] / "configs" / "shapes.yaml"
PARTS = ("vision", "LLM", "codebook", "pixel decoder", "postprocess", "losses", "optimizer")


def labelled(part: str, fn: Callable) -> Callable:
    """``fn`` run inside ``record_function(part)``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(part):
            return fn(*args, **kwargs)

    return run


def label_parts(task: PixelLMTask) -> None:
    """Wrap the task's parts (instance attributes only) so that their forward runs under a part label."""
    targets = {
        "vision": [(task.vision, "forward")],
        "LLM": [(task.lmm, "embed_image"), (task.lmm, "build_inputs"), (task.lmm, "forward")],
        "codebook": [(task.codebook, "gather"), (task.codebook, "forward")],
        "pixel decoder": [(task.projection, "forward"), (task.decoder, "forward")],
        "postprocess": [(task.decoder, "postprocess")],
        "losses": [(task.lmm, "next_token_loss"), (task.loss, "forward")],
    }
    for part, methods in targets.items():
        for obj, name in methods:
            setattr(obj, name, labelled(part, getattr(obj, name)))


def build(overrides: list[str]) -> tuple[PixelLMTask, dict]:
    """The task and one training batch of the default config."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the parser reads `args` only
        cli = LightningCLI(PixelLMTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           auto_configure_optimizers=False, run=False,
                           args=["--config", str(CONFIG), "--data.init_args.num_train_images=64", *overrides])
    cli.datamodule.setup("fit")
    return cli.model, next(iter(cli.datamodule.train_dataloader()))


def train_step(task: PixelLMTask, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """One step as Lightning runs it with gradient_clip_val=1.0: forward, loss, backward, clip, step."""
    ce, masks = task.teacher_forced(batch)
    loss = task.loss(ce, masks, batch["masks"])["loss"]
    loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def part_times(prof: profile) -> dict[str, float]:
    """Wall time (us) of every part: its labelled forward ranges plus the backward ops they created."""
    events = prof.events()
    ranges = [e for e in events if e.name in PARTS]
    part_of_sequence: dict[int, str] = {}
    for event in events:
        if event.sequence_nr < 0 or event.name in PARTS or event.name.startswith("autograd::"):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in PARTS:
            parent = parent.cpu_parent
        if parent is not None:
            part_of_sequence.setdefault(event.sequence_nr, parent.name)
    times: dict[str, float] = defaultdict(float)
    for event in ranges:
        if event.cpu_parent is None or event.cpu_parent.name not in PARTS:  # outermost label only
            times[event.name] += event.cpu_time_total
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function"):
            times[part_of_sequence.get(event.sequence_nr, "other")] += event.cpu_time_total
    return times


def peak_memory(prof: profile) -> int:
    """Highest running sum (bytes) of the ops' own allocations and frees, in time order, over the profiled steps."""
    allocations = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    args, overrides = parser.parse_known_args()  # the rest: CLI overrides, e.g. --data.init_args.batch_size=8
    os.environ.setdefault("PIXELLM_CACHE", tempfile.mkdtemp(prefix="pixellm-bench-"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task, batch = build(overrides)
    task.train()
    optimizer = task.optimizer_factory([p for p in task.parameters() if p.requires_grad])
    label_parts(task)
    for _ in range(2):
        train_step(task, optimizer, batch)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(task, optimizer, batch)
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(args.steps):
            train_step(task, optimizer, batch)
    times = part_times(prof)
    total = sum(times.values())
    questions = len(batch["masks"])
    print(f"configs/shapes.yaml training step: {questions} questions, {sum(len(m) for m in batch['masks'])} masks, "
          f"{args.steps} profiled steps, CPU fp32, 1 thread")
    print(f"{'part':<22}{'share of step':>14}")
    for part in (*PARTS, "other"):
        print(f"{part:<22}{100 * times.get(part, 0.0) / total:>13.1f}%")
    print(f"samples/s (without the profiler): {questions / wall:.1f}")
    print(f"peak memory above the weights: {peak_memory(prof) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
