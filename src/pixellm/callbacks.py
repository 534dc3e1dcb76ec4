"""Callbacks the shipped configs use."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from rich.console import Console
from rich.table import Table


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
