"""``pixellm fit|validate|test|predict --config DATA.yaml --model DIR [--base-model DIR] [--vision-model DIR]``:
LightningCLI on an exported folder.

The folder's ``config.json`` gives the model section (its components override those of the
configs), and its weights are loaded, strictly, once LightningCLI has built the task and before it
runs: validate or test a released/converted model, or fine-tune from it, on any data config.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from pixellm.export import CONFIG_NAME, folder_model_config, load_folder_weights, read_config
from pixellm.main import CLI_SETUP
from pixellm.task import PixelLMTask


def option_value(args: list[str], flag: str) -> tuple[str | None, int, int]:
    """(value, index, width) of the first ``flag VALUE`` or ``flag=VALUE`` in ``args`` (width: the
    arguments it takes), or (None, -1, 0)."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1], i, 1
        if arg == flag and i + 1 < len(args):
            return args[i + 1], i, 2
    return None, -1, 0


def model_folder(args: list[str]) -> tuple[Path, int] | None:
    """(folder, index of its argument) when ``--model`` names an exported folder, else None."""
    value, index, _ = option_value(args, "--model")
    if value is not None and (Path(value) / CONFIG_NAME).is_file():
        return Path(value), index
    return None


class PretrainedFolderCLI(LightningCLI):
    """LightningCLI whose model is built from an exported folder and loaded with its weights.

    Args:
        folder: the exported folder.
        model_config: its resolved ``model`` section (see ``folder_model_config``).
        args: the command line, ``--model DIR`` replaced by ``model_config``.
    """

    def __init__(self, folder: Path, model_config: dict, args: list[str]) -> None:
        self.folder = folder
        self.folder_config = model_config
        super().__init__(PixelLMTask, LightningDataModule, **CLI_SETUP, args=args)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        load_folder_weights(self.model, self.folder, self.folder_config)
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        """The data module must prepare inputs as the folder's model was trained to take them (its
        ``config.json`` ``preprocess``): an error for evaluation, a warning for ``fit`` (fine-tuning to
        other inputs may be meant). Fields a data module does not have are not compared."""
        recorded = read_config(self.folder)["preprocess"]
        differing = [
            f"{name}: the data module's {_plain(getattr(self.datamodule, name))}, the folder's {_plain(value)}"
            for name, value in recorded.items()
            if hasattr(self.datamodule, name) and _plain(getattr(self.datamodule, name)) != _plain(value)
        ]
        if not differing:
            return
        message = (
            f"{self.folder / CONFIG_NAME}: the model was trained with other inputs than the data module makes "
            f"({'; '.join(differing)}); set --data.init_args.<field> to the folder's value"
        )
        if self.subcommand != "fit":
            raise SystemExit(f"pixellm: {message}")
        warnings.warn(message, stacklevel=2)


def _plain(value: object) -> object:
    """A preprocessing value as ``config.json`` holds it (lists for tuples)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def run_on_folder(args: list[str]) -> LightningCLI | None:
    """Run LightningCLI with ``--model DIR`` resolved, or return None when no folder is named.

    ``--base-model DIR`` / ``--vision-model DIR`` replace the folder's recorded LLaVA / CLIP base
    folders (as for ``pixellm predict``), for a folder whose bases moved.
    """
    if model_folder(args) is None:
        return None
    found = {}
    for flag in ("--model", "--base-model", "--vision-model"):
        value, index, width = option_value(args, flag)
        if value is not None:
            found[flag] = value
            args = args[:index] + args[index + width :]
    folder = Path(found["--model"])
    _, model_config = folder_model_config(folder, found.get("--base-model"), found.get("--vision-model"))
    return PretrainedFolderCLI(folder, model_config, [*args, "--model", json.dumps(model_config)])
