"""The ``pixellm`` command: LightningCLI over PixelLMTask and any LightningDataModule.

    pixellm fit --config configs/shapes.yaml
    pixellm validate --config configs/shapes.yaml --ckpt_path last
    pixellm predict --config configs/shapes.yaml --ckpt_path PATH
    pixellm fit --config configs/shapes.yaml --print_config
"""

from __future__ import annotations

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from pixellm.reliability.checkpoint_io import CheckpointCheckingCLI
from pixellm.task import PixelLMTask


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI with ``args`` (``None`` reads ``sys.argv``)."""
    return CheckpointCheckingCLI(
        PixelLMTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console() -> None:
    """Entry point of the ``pixellm`` console script (exit status 0 on success)."""
    main()


if __name__ == "__main__":
    console()
