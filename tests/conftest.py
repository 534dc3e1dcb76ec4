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
