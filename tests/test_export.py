"""The exported folder: round trip, strict loading, LoRA adapter and merge, `pixellm export`."""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from trained_tiny import OTHER_QUESTION, QUESTION, random_image

from pixellm.export import (
    ADAPTER_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Preprocess,
    PretrainedModel,
    instantiate_task,
    load_pretrained,
    save_pretrained,
)
from pixellm.inference.predictor import Predictor, Request
from pixellm.main import main
from pixellm.reliability.checkpoint_io import CheckpointError
from pixellm.task import PixelLMTask


def requests() -> list[Request]:
    return [Request(random_image(50 + i, (40, 28)), q) for i, q in enumerate([QUESTION, OTHER_QUESTION])]


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_export_then_load_gives_identical_weights_text_and_masks(trained_tiny, exported_tiny):
    task, datamodule, _ = trained_tiny
    config = json.loads((exported_tiny / CONFIG_NAME).read_text())
    arch = config["architecture"]
    assert (arch["num_scales"], arch["tokens_per_scale"], arch["fusion"]) == (2, 3, "linear")
    assert arch["codebook_tokens"] == [f"[SEG{i}]" for i in range(6)]
    assert (arch["decoder_dim"], arch["llm_hidden_size"], arch["image_size"], arch["grid_size"]) == (16, 32, 32, 4)
    assert config["preprocess"] == {"image_size": 32, "pixel_mean": [123.675, 116.28, 103.53],
                                    "pixel_std": [58.395, 57.12, 57.375], "template": "plain"}
    assert sorted(p.name for p in exported_tiny.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "tokenizer"]

    loaded = load_pretrained(exported_tiny)
    original = task.state_dict()
    assert loaded.task.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in loaded.task.state_dict().items())

    preprocess = Preprocess(**config["preprocess"])
    assert loaded.preprocess == preprocess
    before = Predictor(PretrainedModel(task, preprocess, exported_tiny)).predict(requests())
    after = Predictor(loaded).predict(requests())
    for a, b in zip(before, after, strict=True):
        assert a.text == b.text == "the circle [1] and the square [2]."
        assert torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)
        assert 0.1 < a.masks.float().mean() < 0.9  # masks that are neither empty nor full


def test_loading_refuses_missing_and_unexpected_keys_naming_them(exported_tiny, tmp_path):
    folder = copy_folder(exported_tiny, tmp_path)
    state = load_file(str(folder / WEIGHTS_NAME))
    del state["decoder.iou_token.weight"]
    state["decoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys \[decoder\.iou_token\.weight\]; unexpected keys \[decoder\.extra\.weight\]"):
        load_pretrained(folder)


def test_loading_refuses_a_config_that_builds_other_shapes(exported_tiny, tmp_path):
    folder = copy_folder(exported_tiny, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model"]["init_args"]["decoder"]["init_args"]["mlp_dim"] = 48  # weights hold 32
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"decoder\.transformers\.0\.layers\.0\.mlp\.layers\.0\.weight: file \(32, 16\), config builds \(48, 16\)"):
        load_pretrained(folder)


def test_loading_refuses_a_model_section_that_contradicts_the_architecture(exported_tiny, tmp_path):
    folder = copy_folder(exported_tiny, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model"]["init_args"]["codebook"]["init_args"]["fusion"] = "mean"
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fusion: built 'mean', recorded 'linear'"):
        load_pretrained(folder)


@pytest.fixture(scope="module")
def lora_task(trained_tiny, tmp_path_factory):
    """The tiny model on a saved 'pretrained' LLaVA with LoRA (random, non-zero updates)."""
    task, _, model_config = trained_tiny
    base = tmp_path_factory.mktemp("llava-base")
    task.lmm.llava.save_pretrained(base)
    config = copy.deepcopy(model_config)
    config["init_args"]["lmm"]["init_args"].update(
        pretrained=str(base), text_config=None, lora={"r": 4, "alpha": 8, "dropout": 0.0}
    )
    config["init_args"].pop("optimizer")
    lora = instantiate_task(config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return lora.eval(), config, base


def test_lora_export_keeps_base_weights_out_and_reloads_from_the_base(lora_task, tmp_path):
    task, config, base = lora_task
    folder = save_pretrained(task, tmp_path / "lora", config, Preprocess(image_size=32, template="plain"))
    saved = load_file(str(folder / WEIGHTS_NAME))
    assert not any("lora_" in k for k in saved)
    assert "lmm.llava.model.language_model.layers.0.mlp.up_proj.weight" not in saved  # from the base
    assert "lmm.llava.lm_head.weight" in saved and "decoder.iou_token.weight" in saved  # trained
    adapter = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(
        f"base_model.model.model.language_model.layers.0.self_attn.{p}_proj.lora_{ab}.weight"
        for p in "qv" for ab in "AB"
    )
    loaded = load_pretrained(folder, base_model=str(base)).task
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in loaded.state_dict().items())

    from peft import PeftModel  # the adapter folder is peft's own format

    plain = copy.deepcopy(config)
    plain["init_args"]["lmm"]["init_args"]["lora"] = None
    peft_model = PeftModel.from_pretrained(instantiate_task(plain).lmm.llava, folder / ADAPTER_DIR)
    name = "model.language_model.layers.0.self_attn.v_proj.lora_B.default.weight"
    assert torch.equal(peft_model.state_dict()[f"base_model.model.{name}"], task.state_dict()[f"lmm.llava.{name}"])

    moved = tmp_path / "moved"
    config_json = json.loads((folder / CONFIG_NAME).read_text())
    config_json["model"]["init_args"]["lmm"]["init_args"]["pretrained"] = str(moved)
    (folder / CONFIG_NAME).write_text(json.dumps(config_json))
    with pytest.raises(FileNotFoundError, match="pass base_model=LOCAL_DIR"):
        load_pretrained(folder)


def test_lightning_commands_take_a_moved_base_with_base_model(lora_task, tiny_config, tmp_path):
    """`pixellm validate --model DIR --base-model BASE` where DIR's recorded LLaVA folder moved."""
    task, config, base = lora_task
    folder = save_pretrained(task, tmp_path / "lora", config, Preprocess(image_size=32, template="plain"))
    config_json = json.loads((folder / CONFIG_NAME).read_text())
    config_json["model"]["init_args"]["lmm"]["init_args"]["pretrained"] = str(tmp_path / "moved")
    (folder / CONFIG_NAME).write_text(json.dumps(config_json))
    command = ["validate", "--config", str(tiny_config), "--model", str(folder),
               "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(FileNotFoundError, match=r"pass base_model=LOCAL_DIR \(CLI: --base-model\)"):
        main(command)
    cli = main([*command, f"--base-model={base}"])
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in cli.model.state_dict().items())
    assert 0.0 <= float(cli.trainer.callback_metrics["val/gIoU"]) <= 1.0


def test_merged_export_needs_no_base_and_answers_like_the_adapter(lora_task, tmp_path):
    task, config, _ = lora_task
    preprocess = Preprocess(image_size=32, template="plain")
    folder = save_pretrained(task, tmp_path / "merged", config, preprocess, merge=True)
    assert not (folder / ADAPTER_DIR).exists()
    merged = load_pretrained(folder)  # the LLM is rebuilt from its config: no base folder needed
    assert merged.task.lmm.lora is None
    batch = Predictor(PretrainedModel(task, preprocess, folder))._batch(requests())
    hidden = task.lmm(task.encode(batch, with_labels=False)[1])
    merged_hidden = merged.task.lmm(merged.task.encode(batch, with_labels=False)[1])
    assert torch.allclose(hidden, merged_hidden, atol=1e-5)
    assert not torch.allclose(hidden, merged_hidden * 0)


def test_export_command_reads_a_lightning_checkpoint_and_the_saved_run_config(tiny_config, tmp_path):
    cli = main(["fit", "--config", str(tiny_config), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # next to tmp_path/config.yaml, as a run's are
    cli.trainer.save_checkpoint(ckpt)
    out = tmp_path / "exported"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = PixelLMTask.from_pretrained(str(out)).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())


def test_export_command_refuses_a_checkpoint_that_needs_unpickling_code(tiny_config, tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": pickle.loads(pickle.dumps(Path("x")))}, ckpt)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: not a loadable checkpoint \(UnpicklingError: Weights only load failed"):
        main(["export", "--config", str(tiny_config), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "o")])
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated: the file is named, not a bare OSError
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: not a loadable checkpoint"):
        main(["export", "--config", str(tiny_config), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "o")])
    folder = tmp_path / "last.ckpt"  # what DeepSpeedStrategy saves
    (folder / "checkpoint").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"last\.ckpt: a DeepSpeed checkpoint folder.*convert_zero_checkpoint_to_fp32"):
        main(["export", "--config", str(tiny_config), "--ckpt_path", str(folder), "--out", str(tmp_path / "o")])


def test_validate_runs_on_an_exported_folder_with_its_weights(tiny_config, exported_tiny, tmp_path):
    cli = main(["validate", "--config", str(tiny_config), "--model", str(exported_tiny),
                "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])
    exported = load_file(str(exported_tiny / WEIGHTS_NAME))
    assert exported.keys() == cli.model.state_dict().keys()
    assert all(torch.equal(cli.model.state_dict()[k], v) for k, v in exported.items())
    assert cli.model.max_new_tokens == 24 and 0.0 <= float(cli.trainer.callback_metrics["val/gIoU"]) <= 1.0


def test_data_that_prepares_other_inputs_than_the_folders_model_took_is_named(tiny_config, exported_tiny, tmp_path):
    command = ["--config", str(tiny_config), "--model", str(exported_tiny), "--data.init_args.template=llava_v1",
               "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"]
    expected = r"tiny/config\.json: .*template: the data module's llava_v1, the folder's plain"
    with pytest.raises(SystemExit, match=expected):
        main(["validate", *command])
    with pytest.warns(UserWarning, match=expected):  # fine-tuning to other inputs may be meant
        cli = main(["fit", *command, "--trainer.max_steps=1"])
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("weights.file", "../outside.safetensors"), ("weights.file", "/etc/passwd"),
     ("model.init_args.tokenizer", "/tmp/some_tokenizer"), ("weights.adapter", "../adapter")],
)
def test_a_folders_config_cannot_name_files_outside_it(exported_tiny, tmp_path, field, value):
    folder = tmp_path / "copy"
    shutil.copytree(exported_tiny, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    *path, last = field.split(".")
    section = config
    for key in path:
        section = section[key]
    section[last] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config\.json: field '{re.escape(field)}': .* is not a path inside the folder"):
        load_pretrained(folder)


def test_only_the_architecture_of_a_folders_model_section_is_read(exported_tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported_tiny, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model"]["init_args"]["optimizer"] = {"class_path": "no_such_module_anywhere.Optimizer"}  # never imported
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert load_pretrained(folder).task.state_dict().keys() == load_pretrained(exported_tiny).task.state_dict().keys()


def test_a_folder_keeps_whether_image_padding_is_masked(exported_tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported_tiny, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert load_pretrained(folder).task.mask_image_padding  # the default
    config["model"]["init_args"]["mask_image_padding"] = False  # as a run trained with it off writes it
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert not load_pretrained(folder).task.mask_image_padding


def test_a_truncated_weight_file_in_a_folder_is_named(exported_tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported_tiny, folder)
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: not a loadable checkpoint .*copy it again"):
        load_pretrained(folder)


def test_a_relative_base_folder_is_recorded_so_any_working_directory_finds_it(lora_task, tmp_path, monkeypatch):
    task, config, base = lora_task
    relative = copy.deepcopy(config)
    monkeypatch.chdir(base.parent)
    relative["init_args"]["lmm"]["init_args"]["pretrained"] = base.name  # as `pixellm fit` run from base.parent
    folder = save_pretrained(task, tmp_path / "lora", relative, Preprocess(image_size=32, template="plain"))
    recorded = json.loads((folder / CONFIG_NAME).read_text())
    assert recorded["model"]["init_args"]["lmm"]["init_args"]["pretrained"] == str(base.resolve()) == recorded["base_model"]
    monkeypatch.chdir(tmp_path)  # elsewhere
    loaded = load_pretrained(folder).task
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in loaded.state_dict().items())
