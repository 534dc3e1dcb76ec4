"""The ``pixellm`` command: LightningCLI over PixelLMTask and any LightningDataModule, plus tools.

    pixellm fit --config configs/shapes.yaml
    pixellm validate --config configs/shapes.yaml --ckpt_path last
    pixellm predict --config configs/shapes.yaml --ckpt_path PATH
    pixellm fit --config configs/shapes.yaml --print_config
    pixellm validate --config configs/shapes.yaml --model DIR  (an exported folder's model)

Sub-commands that are not LightningCLI's (each has its own ``--help``):

    pixellm export --ckpt_path CKPT --out DIR [--merge]       a self-describing model folder
    pixellm predict --model DIR --image PATH --question TEXT  answers, masks, overlays on your images
    pixellm chat --model DIR --image PATH                     an interactive loop on one image
    pixellm convert-official SRC DST --vision-model CLIP_DIR  the released PixelLM weights
    pixellm convert-refs ...                                  refCOCO-family annotations
"""

from __future__ import annotations

import importlib
import os
import sys

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from pixellm.reliability.checkpoint_io import CheckpointCheckingCLI
from pixellm.task import PixelLMTask

# how LightningCLI is set up for PixelLMTask (components by class_path, our own optimizer wiring)
CLI_SETUP = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "auto_configure_optimizers": False,
    "save_config_kwargs": {"overwrite": True},
}
# sub-command -> "module:function(argv: list[str])", imported only when used
TOOLS = {
    "export": "pixellm.export_command:export_command",
    "chat": "pixellm.inference.commands:chat_command",
    "convert-official": "pixellm.convert_official:convert_official_command",
    "convert-refs": "pixellm.data.refer:convert_refs_command",
}
FOLDER_PREDICT = "pixellm.inference.commands:predict_command"
FOLDER_PREDICT_FLAGS = ("--image", "--jsonl")
LIGHTNING_PREDICT_PREFIXES = ("--data", "--trainer", "--ckpt_path", "--seed_everything")  # LightningCLI's options


def tool_for(args: list[str]) -> str | None:
    """The ``module:function`` that handles ``args``, or None for LightningCLI.

    ``predict`` belongs to LightningCLI unless it is given ``--image`` or ``--jsonl`` (inputs of an
    exported folder), or an exported folder as ``--model`` and none of LightningCLI's own options (so
    that the folder tool, not LightningCLI, says what is missing); ``predict --config DATA --model DIR``
    (or ``-c``, ``--data ...``, ``--trainer ...``) stays LightningCLI's.
    """
    if not args:
        return None
    if args[0] == "predict":
        from pixellm.pretrained_cli import model_folder  # late import: it imports this module

        flags = [a.split("=")[0] for a in args[1:] if a.startswith("-")]
        lightning = any(f in ("-c", "--config") or f.startswith(LIGHTNING_PREDICT_PREFIXES) for f in flags)
        if any(f in FOLDER_PREDICT_FLAGS for f in flags) or (not lightning and model_folder(args[1:])):
            return FOLDER_PREDICT
    return TOOLS.get(args[0])


def run_tool(target: str, argv: list[str]) -> None:
    """Import ``module:function`` and call it with ``argv``.

    Raises:
        SystemExit: the module or function does not exist (with a message that names it).
    """
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SystemExit(f"pixellm: this sub-command needs {module_name}, which is not installed ({err})") from err
    function = getattr(module, function_name, None)
    if function is None:
        raise SystemExit(f"pixellm: {module_name} has no {function_name}")
    function(argv)


def lightning_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    """LightningCLI over PixelLMTask and any data module; ``run=False`` only builds them."""
    return CheckpointCheckingCLI(PixelLMTask, LightningDataModule, **CLI_SETUP, run=run, args=args)


def main(args: list[str] | None = None) -> LightningCLI | None:
    """Run the CLI with ``args`` (``None`` reads ``sys.argv``); returns LightningCLI's object."""
    argv = sys.argv[1:] if args is None else list(args)
    target = tool_for(argv)
    if target is not None:
        run_tool(target, argv[1:])
        return None
    from pixellm.pretrained_cli import run_on_folder  # late import: it imports pixellm.export

    return run_on_folder(argv) or lightning_cli(args)


def console() -> None:
    """Entry point of the ``pixellm`` console script (exit status 0 on success).

    A console script does not look for modules in the working directory, as ``python -m`` does; a
    ``class_path`` to the user's own module there (README: a pixel decoder variant) needs it. It is
    searched last, so a file there never shadows an installed package.
    """
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    main()


if __name__ == "__main__":
    console()
