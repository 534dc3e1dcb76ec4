"""Shared fixtures: a private dataset cache, and the tiny PixelLM of tests/conf/tiny.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

CONF = Path(__file__).parent / "conf"


@pytest.fixture(autouse=True, scope="session")
def dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated datasets go to one temp folder per test session, never to the user's cache."""
    path = tmp_path_factory.mktemp("pixellm-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PIXELLM_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return CONF / "tiny.yaml"


@pytest.fixture(scope="session")
def build():
    """``build(config, *overrides)``: the task and data module a `pixellm` run would build, not run."""
    return build_from_config


def build_from_config(config: Path, *overrides: str):
    """The task and data module a `pixellm` run would build from ``config``, not run."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from pixellm.task import PixelLMTask

    cli = LightningCLI(
        PixelLMTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(config), *overrides],
    )
    return cli.model, cli.datamodule


@pytest.fixture(scope="session")
def trained_tiny(tiny_config):
    """(task, datamodule, model section) of the tiny model taught an answer (tests/trained_tiny.py)."""
    from trained_tiny import MAX_NEW_TOKENS, train_tiny

    from pixellm.main import lightning_cli

    args = ["--config", str(tiny_config), f"--model.init_args.max_new_tokens={MAX_NEW_TOKENS}"]
    cli = lightning_cli(args, run=False)
    train_tiny(cli.model, cli.datamodule)
    return cli.model, cli.datamodule, cli.config.as_dict()["model"]


@pytest.fixture(scope="session")
def exported_tiny(trained_tiny, tmp_path_factory) -> Path:
    """The folder ``pixellm export`` writes for ``trained_tiny``."""
    from trained_tiny import export_tiny

    return export_tiny(*trained_tiny, tmp_path_factory.mktemp("exported") / "tiny")
