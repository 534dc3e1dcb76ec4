"""Checkpoint files written atomically, read safely, and failing with a message that names them.

Lightning's ``TorchCheckpointIO`` writes the final file in place, so a run killed while saving
leaves a truncated ``last.ckpt``, and a truncated file then fails in ``torch.load`` with a zip or
pickle traceback. ``AtomicCheckpointIO`` writes to a hidden temporary file in the same folder,
flushes it to disk and ``os.replace``-s it over the target (atomic on POSIX and Windows), so a
crash at any point leaves the previous checkpoint whole; it loads with ``weights_only=True`` and
turns any failure into a ``CheckpointError`` naming the file. Use it as ``trainer.plugins``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded (names the file and what to do)."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``.

    The temporary file is removed when saving fails; ``path`` is then untouched. A process killed
    while saving leaves its temporary file behind: the next save of ``path`` removes those that were
    last written before it started.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # hidden: no "last*.ckpt" glob
    try:
        with open(tmp, "xb") as handle:  # the umask's permissions, like a plain save
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if stale.stat().st_mtime < started:
                stale.unlink()


def _unloadable(path: Path, err: Exception, remedy: str = "resume from an earlier checkpoint") -> CheckpointError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return CheckpointError(
        f"{path}: not a loadable checkpoint ({type(err).__name__}: {first_line}). It is "
        "truncated or corrupt (e.g. a copy cut short), or holds objects that safe "
        f"(weights_only) loading refuses; {remedy}"
    )


def check_checkpoint_file(path: str | Path) -> None:
    """Cheap check of a checkpoint's container (its zip directory, read from the file's end).

    Raises:
        CheckpointError: If ``path`` is not a zip of ``torch.save`` (e.g. truncated).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unloadable(path, err) from None
    if not any(name.endswith("/data.pkl") for name in names):
        raise _unloadable(path, ValueError("no data.pkl in the archive"))


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", remedy: str = "resume from an earlier checkpoint"
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure turned into ``CheckpointError``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If it is truncated, corrupt, not a checkpoint, or holds objects that
            ``weights_only`` loading refuses (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip, pickle and storage errors all mean "unusable file"
        raise _unloadable(path, err, remedy) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: ``.safetensors``, else a ``torch.save`` dict read with
    ``weights_only=True``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If it is truncated or corrupt (the message names the file).
    """
    path, remedy = Path(path), "write or copy it again"
    if path.suffix != ".safetensors":
        return load_checkpoint_file(path, remedy=remedy)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _unloadable(path, err, remedy) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, ``weights_only`` reads, errors that name the file.

    Remote paths (``s3://...``) fall back to Lightning's ``TorchCheckpointIO``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | Any = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location)


def _init_arg(component: Any, name: str) -> Any:
    """``component.init_args.<name>`` of a parsed ``class_path`` component, else None."""
    return getattr(getattr(component, "init_args", None), name, None)


def last_checkpoint_places(config: Any) -> list[tuple[Path, str]]:
    """Where runs of ``config`` (one sub-command's parsed section) keep ``last.ckpt``, as (folder, glob
    pattern): the ``ModelCheckpoint`` ``dirpath``s; else the ``checkpoints/`` of every version folder
    under the loggers' ``save_dir``; else Lightning's defaults under ``trainer.default_root_dir``
    (``lightning_logs/version_N/checkpoints``, or ``checkpoints`` without a logger)."""
    callbacks = config.get("trainer.callbacks") or []
    dirpaths = [Path(d) for d in (_init_arg(c, "dirpath") for c in callbacks) if d]
    if dirpaths:
        return [(d, "last*.ckpt") for d in dirpaths]
    loggers = config.get("trainer.logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    save_dirs = [Path(d) for d in (_init_arg(lg, "save_dir") for lg in loggers) if d]
    if save_dirs:
        return [(d, "**/checkpoints/last*.ckpt") for d in save_dirs]
    root = Path(config.get("trainer.default_root_dir") or ".")
    return [(root / "lightning_logs", "**/checkpoints/last*.ckpt"), (root / "checkpoints", "last*.ckpt")]


def find_last_checkpoint(config: Any) -> Path | None:
    """The newest ``last*.ckpt`` of earlier runs of ``config``, whichever version folder its logger
    numbered (Lightning's own ``"last"`` looks only in the new run's, empty, folder)."""
    found = [path for folder, pattern in last_checkpoint_places(config) for path in folder.glob(pattern)]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


class CheckpointCheckingCLI(LightningCLI):
    """``LightningCLI`` that resolves ``--ckpt_path last`` to the newest ``last.ckpt`` of earlier runs
    (``find_last_checkpoint``; ``validate`` / ``test`` / ``predict`` fail naming where they looked
    when there is none, ``fit`` then starts afresh) and checks the file before Lightning's CLI
    ``torch.load``-s it (for its hyper-parameters), so a truncated file fails with a
    ``CheckpointError`` naming it."""

    def parse_arguments(self, parser: ArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path == "last":
            found = find_last_checkpoint(self.config[subcommand])
            if found is None and subcommand != "fit":
                places = ", ".join(str(f / p) for f, p in last_checkpoint_places(self.config[subcommand]))
                raise FileNotFoundError(f"--ckpt_path last: no checkpoint of an earlier run matches {places}")
            if found is not None:
                path = self.config[subcommand]["ckpt_path"] = str(found)
                print(f"--ckpt_path last: {found}", file=sys.stderr)
        if path and Path(path).is_file():
            check_checkpoint_file(path)
