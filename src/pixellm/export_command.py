"""``pixellm export``: a Lightning checkpoint and its config -> an exported folder.

    pixellm export --ckpt_path outputs/shapes/version_0/checkpoints/last.ckpt --out models/shapes
    pixellm export --config configs/muse.yaml --ckpt_path CKPT --out models/pixellm-7b --merge

Without ``--config`` the ``config.yaml`` that ``pixellm fit`` saved next to the checkpoint folder
(``version_N/config.yaml`` for ``version_N/checkpoints/*.ckpt``) is used.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule, Trainer

from pixellm.export import Preprocess, save_pretrained
from pixellm.main import lightning_cli
from pixellm.reliability.checkpoint_io import load_checkpoint_file
from pixellm.task import PixelLMTask


def preprocess_of(datamodule: LightningDataModule, task: PixelLMTask) -> Preprocess:
    """The preprocessing a data module applies (its ``image_size``, normalisation, template).

    Raises:
        ValueError: the data module lacks one of them or its image size differs from the model's.
    """
    fields = {"image_size": None, "pixel_mean": None, "pixel_std": None, "template": None}
    missing = [name for name in fields if not hasattr(datamodule, name)]
    if missing:
        raise ValueError(
            f"{type(datamodule).__name__} has no {missing}: export needs a data module that records "
            "its preprocessing (e.g. MuseDataModule)"
        )
    values = {name: getattr(datamodule, name) for name in fields}
    if values["image_size"] != task.vision.image_size:
        raise ValueError(
            f"data image_size {values['image_size']} differs from the vision encoder's {task.vision.image_size}"
        )
    values["pixel_mean"], values["pixel_std"] = tuple(values["pixel_mean"]), tuple(values["pixel_std"])
    return Preprocess(**values)


def find_run_config(ckpt_path: Path) -> Path:
    """``version_N/config.yaml`` for a checkpoint under ``version_N/checkpoints/``."""
    candidate = ckpt_path.resolve().parent.parent / "config.yaml"
    if not candidate.is_file():
        raise FileNotFoundError(
            f"no --config given and {candidate} (saved by `pixellm fit`) does not exist: pass --config"
        )
    return candidate


def config_text(path: Path) -> str:
    """A config file's YAML without the arguments of ``Trainer.fit`` itself (``ckpt_path``,
    ``weights_only``), which a run's saved ``config.yaml`` holds but a model-building parser refuses."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config not found")
    config = yaml.safe_load(path.read_text()) or {}
    for name in inspect.signature(Trainer.fit).parameters.keys() - {"self", "model", "datamodule"}:
        config.pop(name, None)
    return yaml.safe_dump(config)


def load_checkpoint_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read with ``weights_only=True``."""
    if ckpt_path.is_dir():  # DeepSpeedStrategy (configs/muse.yaml) saves each checkpoint as a folder
        raise ValueError(
            f"{ckpt_path}: a DeepSpeed checkpoint folder, not one file; consolidate it first with Lightning's "
            f"lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict("
            f"'{ckpt_path}', 'consolidated.ckpt') (needs deepspeed), then export consolidated.ckpt"
        )
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found")
    checkpoint = load_checkpoint_file(ckpt_path)  # weights_only; a failure names the file
    if "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint["state_dict"]


def export_command(argv: list[str]) -> None:
    """Run ``pixellm export`` with the arguments after the sub-command."""
    parser = argparse.ArgumentParser(prog="pixellm export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt_path", "--ckpt-path", type=Path, required=True, help="Lightning checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--config", type=Path, action="append", help="config(s) the run used (default: found)")
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the LLM weights")
    args, overrides = parser.parse_known_args(argv)
    configs = args.config or [find_run_config(args.ckpt_path)]
    cli_args = [a for c in configs for a in ("--config", config_text(c))] + overrides
    cli = lightning_cli(cli_args, run=False)
    task = cli.model
    result = task.load_state_dict(load_checkpoint_state(args.ckpt_path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{args.ckpt_path} does not fit the config {[str(c) for c in configs]}: missing "
            f"{result.missing_keys[:20]}, unexpected {result.unexpected_keys[:20]}"
        )
    model_config = cli.config.as_dict()["model"]
    out = save_pretrained(task, args.out, model_config, preprocess_of(cli.datamodule, task), merge=args.merge)
    print(f"exported {args.ckpt_path} to {out}")
