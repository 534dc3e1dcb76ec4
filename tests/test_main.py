"""The `pixellm` command: every shipped config parses, a short run works, the README example runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import pixellm.main
from pixellm.main import console, lightning_cli, main

ROOT = Path(__file__).resolve().parents[1]
DECODER_EXAMPLE_MARKER = "<!-- pixel-decoder-example -->"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_with_the_real_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: pixellm.task.PixelLMTask" in printed


def test_fit_with_fast_dev_run(tiny_config, tmp_path):
    cli = main(["fit", "--config", str(tiny_config), "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert "train/loss" in cli.trainer.callback_metrics


def test_validate_reports_giou_and_ciou(tiny_config, tmp_path, capsys):
    cli = main(
        ["validate", "--config", str(tiny_config), "--trainer.callbacks+=pixellm.callbacks.ValidationReport",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/gIoU"]) <= 1.0 and 0.0 <= float(metrics["val/cIoU"]) <= 1.0
    assert "val/gIoU" in capsys.readouterr().out


def test_readme_pixel_decoder_example_runs_by_class_path(tiny_config, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(DECODER_EXAMPLE_MARKER + r"\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its PixelDecoder example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 16
    (tmp_path / "my_decoder.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # "next to where you run pixellm", through the console script's entry point
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    decoder = '{"class_path": "my_decoder.DotProductDecoder", "init_args": {"num_scales": 2, "dim": 16}}'
    monkeypatch.setattr(sys, "argv", [
        "pixellm", "fit", "--config", str(tiny_config), f"--model.init_args.decoder={decoder}",
        "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
    ])
    built = []
    monkeypatch.setattr(pixellm.main, "lightning_cli", lambda args: built.append(lightning_cli(args)) or built[-1])
    console()
    cli = built[0]
    assert type(cli.model.decoder).__name__ == "DotProductDecoder"
    assert cli.trainer.global_step == 1
    sys.modules.pop("my_decoder", None)


def test_a_timm_vision_encoder_swaps_in_by_class_path(tiny_config, tmp_path):
    vision = (
        '{"class_path": "pixellm.model.vision.TimmVisionEncoder", "init_args": {"model_name": "vit_tiny_patch16_224", '
        '"image_size": 32, "feature_layers": [-1, 0], "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, '
        '"num_heads": 2}}}'
    )
    cli = main(
        ["fit", "--config", str(tiny_config), f"--model.init_args.vision={vision}", "--trainer.fast_dev_run=1",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    assert type(cli.model.vision).__name__ == "TimmVisionEncoder"
    assert cli.trainer.global_step == 1


def test_test_subcommand_reports_on_the_test_split(tiny_config, tmp_path, capsys):
    cli = main(
        ["test", "--config", str(tiny_config), "--trainer.callbacks+=pixellm.callbacks.ValidationReport",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    assert 0.0 <= float(cli.trainer.callback_metrics["test/gIoU"]) <= 1.0
    assert "test/gIoU" in capsys.readouterr().out


def test_predict_subcommand_generates_and_prints_answers(tiny_config, tmp_path, capsys):
    main(
        ["predict", "--config", str(tiny_config), "--trainer.callbacks+=pixellm.callbacks.PrintPredictions",
         "--trainer.limit_predict_batches=1", f"--trainer.default_root_dir={tmp_path}"]
    )
    printed = capsys.readouterr().out
    assert printed.count("Q: ") == 4 and printed.count("A: ") == 4  # one batch of the tiny config


def test_the_installed_pixellm_command_exits_with_status_zero(tiny_config, tmp_path):
    import subprocess

    command = Path(sys.executable).parent / "pixellm"
    assert command.exists(), "install the package (pip install -e .) to get the `pixellm` command"
    result = subprocess.run(
        [str(command), "fit", "--config", str(tiny_config), "--trainer.fast_dev_run=1",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LightningCLI object" not in result.stderr
