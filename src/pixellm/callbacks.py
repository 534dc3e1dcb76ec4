"""Callbacks the shipped configs use."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table

from pixellm.evaluation.judge import AnswerJudge, IoUOnlyJudge
from pixellm.evaluation.matching import concatenate
from pixellm.evaluation.muse_protocol import (
    judge_question,
    pair_scores,
    question_record,
    target_references,
)
from pixellm.evaluation.overlay import mask_overlay, unnormalise
from pixellm.evaluation.report import SplitResult, markdown_table, write_split_json
from pixellm.metrics.iou import PairedMaskIoU
from pixellm.reliability.skipping import is_empty_batch

log = logging.getLogger(__name__)


class ValidationReport(Callback):
    """Prints the last gIoU / cIoU as a table when fitting ends, and after ``validate`` / ``test``."""

    def _report(self, trainer: Trainer, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        found = {name: trainer.callback_metrics.get(name) for name in (f"{stage}/gIoU", f"{stage}/cIoU")}
        title = "Validation" if stage == "val" else "Test"
        table = Table(title=f"{title} after {trainer.global_step} training steps")
        for name in found:
            table.add_column(name)
        table.add_row(*("-" if v is None else f"{float(v):.4f}" for v in found.values()))
        Console().print(table)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, "val")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, "test")


class PrintPredictions(Callback):
    """Prints each predicted answer with its mask count (``pixellm predict``); at most ``limit`` lines."""

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self.printed = 0

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: list[dict], batch: dict,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        console = Console()
        for item in outputs:
            if self.printed >= self.limit:
                return
            masks = item["masks"]
            console.print(f"[bold]Q:[/bold] {item['question']}", markup=True, highlight=False, soft_wrap=True)
            console.print(f"[bold]A:[/bold] {item['answer']}  ({masks.shape[0]} masks)", markup=True, highlight=False, soft_wrap=True)
            self.printed += 1


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's records (rank order) when running distributed, else ``records``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [r for part in gathered for r in (part or [])]


class EvaluationReport(Callback):
    """Scores every evaluation split as the paper does and reports it (Sec. 4.3, Tables 1-3).

    Teacher-forced splits score mask IoU of masks paired in text order. Generate-mode splits follow
    the MUSE protocol: rewrite each generated answer with its matched ground truths' descriptions
    and boxes, have ``judge`` score each target, weight each pair by judge / 10. At the end of each
    validation / test epoch, writes ``<split>.json`` per split (rewritten answers, prompts, judge
    replies, per-pair I and U: enough to re-judge later, see ``pixellm.evaluation.report``) and
    ``table.md`` (the Markdown table) to ``<output_dir>/<stage>_step<N>/``; prints the table at the
    end of ``pixellm validate`` / ``pixellm test`` and of fitting; logs a few mask overlays when a
    logger is a ``TensorBoardLogger``.

    Args:
        judge: the answer judge; ``None`` uses the offline ``IoUOnlyJudge`` ("IoU-only").
        output_dir: where results go; default ``<trainer.log_dir>/evaluation``.
        run_name: the table's row label.
        num_overlays: overlays logged per evaluation epoch (0: none).
    """

    def __init__(
        self,
        judge: AnswerJudge | None = None,
        output_dir: str | None = None,
        run_name: str = "PixelLM (this run)",
        num_overlays: int = 4,
    ) -> None:
        self.judge = judge if judge is not None else IoUOnlyJudge()
        self.output_dir = output_dir
        self.run_name = run_name
        self.num_overlays = num_overlays
        self.table: str | None = None
        self.folder: Path | None = None

    # ------------------------------------------------------------------ per epoch state
    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.splits = pl_module.eval_splits(stage)
        self.metrics = {s.name: PairedMaskIoU().to(pl_module.device) for s in self.splits}
        self.records: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.splits}
        self.unparsed_replies = 0
        self.overlays = 0

    def _batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: list[dict], batch: dict) -> None:
        if is_empty_batch(batch):  # every sample skipped: nothing was evaluated (the skip is counted elsewhere)
            return
        for item, truth in zip(outputs, batch["masks"], strict=True):
            if item["repeat"]:  # evens out the processes, scored on the one that owns it
                continue
            split, pairs = item["split"], item["pairs"]
            rewritten = verdict = None
            if split.mode == "generate":
                references = target_references(item["meta"], truth)
                rewritten, verdict = judge_question(
                    self.judge, item["question"], item["answer"], pairs, item["masks"].shape[0], references,
                    pl_module.codebook.tokens,
                )
                self.unparsed_replies += not verdict.parsed
            scores = pair_scores(pairs, verdict)
            self.metrics[split.name].update(*concatenate([pairs]), scores)
            self.records[split.name].append(
                question_record(item["question"], item["answer"], pairs, scores, item["meta"], rewritten, verdict)
            )
        self._log_overlays(trainer, outputs, batch)

    def _log_overlays(self, trainer: Trainer, outputs: list[dict], batch: dict) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = getattr(datamodule, "pixel_mean", None), getattr(datamodule, "pixel_std", None)
        for b, item in enumerate(outputs):
            if self.overlays >= self.num_overlays:
                return
            image = unnormalise(
                batch["pixel_values"][b], batch["resized_sizes"][b].tolist(), batch["original_sizes"][b].tolist(),
                mean, std,
            )
            overlay = mask_overlay(image, item["masks"].to(image.device), batch["masks"][b].to(image.device))
            tag = f"{item['split'].name}/overlay_{self.overlays}"  # red: prediction, green: ground truth
            loggers[0].experiment.add_image(tag, overlay.cpu(), trainer.global_step)
            self.overlays += 1

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        results = []
        for split in self.splits:
            scores = {k: float(v) for k, v in self.metrics[split.name].compute().items()}
            judge = self.judge.label if split.mode == "generate" else "none"
            results.append(SplitResult(split.name, split.mode, judge, scores, gather_records(self.records[split.name])))
            if split.mode == "generate" and not isinstance(self.judge, IoUOnlyJudge):  # the task logs IoU-only
                for key, value in scores.items():
                    if not math.isnan(value):
                        pl_module.log(f"{split.name}/judged_{key}", value, add_dataloader_idx=False)
        if not trainer.is_global_zero:
            return
        root = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "evaluation"
        self.folder = root / f"{stage}_step{trainer.global_step}"
        for result in results:
            write_split_json(result, self.folder)
        self.table = markdown_table(self.run_name, results)
        (self.folder / "table.md").write_text(self.table + "\n")
        if self.unparsed_replies:
            log.warning("%d judge replies held no list of scores: those targets scored 0 (see %s)",
                        self.unparsed_replies, self.folder)

    def _print(self, trainer: Trainer) -> None:
        if trainer.is_global_zero and self.table is not None:
            print(f"\n{self.table}\nResults: {self.folder}\n")

    # ------------------------------------------------------------------ Lightning hooks
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: list[dict], batch: dict,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end(trainer, pl_module, "val")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: list[dict], batch: dict,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer)
