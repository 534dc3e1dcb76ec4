"""Callbacks the shipped configs use."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from rich.console import Console
from rich.table import Table


class ValidationReport(Callback):
    """Prints the last validation gIoU / cIoU as a table when fitting ends (and after ``validate``)."""

    def __init__(self, metrics: tuple[str, ...] = ("val/gIoU", "val/cIoU")) -> None:
        self.metrics = metrics

    def _report(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        found = {name: trainer.callback_metrics.get(name) for name in self.metrics}
        table = Table(title=f"Validation after {trainer.global_step} steps")
        for name in found:
            table.add_column(name)
        table.add_row(*("-" if v is None else f"{float(v):.4f}" for v in found.values()))
        Console().print(table)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._report(trainer)
