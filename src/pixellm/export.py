"""The exported model folder: a PixelLM that describes itself, like a Hugging Face checkpoint.

    DIR/config.json            every architecture hyper-parameter (see below)
    DIR/model.safetensors      the weights training changed or created (decoder, codebook head,
                               projectors, new token rows, whole LLM/vision tower when trained)
    DIR/adapter/               the LoRA adapter in peft's format (adapter_config.json +
                               adapter_model.safetensors), absent without LoRA or with --merge
    DIR/tokenizer/             the tokenizer, image and codebook tokens included

``config.json`` holds ``model``, the LightningCLI ``model`` section (class paths and init args of
every component: it rebuilds the architecture), ``preprocess`` (image size, normalisation,
conversation template), ``architecture`` (a readable summary: L, N, fusion, widths, token strings
and ids, base model names; checked against what ``model`` builds) and ``weights`` (which files hold
what). Weights that come unchanged from a base checkpoint (a frozen pretrained CLIP; the frozen LLM
under LoRA) are not copied: they are read from ``base_model`` / ``vision_model`` at load time.

Loading (:func:`load_pretrained`) fails, naming the keys, on missing or unexpected weights, on a
shape that the config does not build, and on a tokenizer whose ids differ from the config. Only
safetensors files are read.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from safetensors.torch import save_file
from torch import Tensor

from pixellm.data.errors import DataError
from pixellm.data.images import confined_path
from pixellm.data.preprocess import DEFAULT_PIXEL_MEAN, DEFAULT_PIXEL_STD
from pixellm.reliability.checkpoint_io import load_weight_file
from pixellm.task import PixelLMTask
from pixellm.tokenizer import IMAGE_TOKEN

FORMAT = "pixellm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_DIR = "tokenizer"
PEFT_PREFIX = "base_model.model."  # key prefix of peft's PeftModel.save_pretrained
ADAPTER_NAME = "default"
ARCHITECTURE_COMPONENTS = ("vision", "lmm", "codebook", "projection", "decoder")
MODEL_SETTINGS = ("max_new_tokens", "mask_image_padding", "complete_codebook_groups")  # task arguments a folder keeps beside its parts


@dataclass
class Preprocess:
    """How an image and a question become model inputs (what the data module did in training).

    Attributes:
        image_size: side S of the square model input.
        pixel_mean: RGB mean in 0-255 units.
        pixel_std: RGB standard deviation in 0-255 units.
        template: conversation template name (``pixellm.data.conversation.TEMPLATES``).
    """

    image_size: int
    pixel_mean: tuple[float, float, float] = DEFAULT_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = DEFAULT_PIXEL_STD
    template: str = "llava_v1"


@dataclass
class PretrainedModel:
    """A loaded folder: the task in eval mode, its preprocessing and where it came from."""

    task: PixelLMTask
    preprocess: Preprocess
    directory: Path


# ---------------------------------------------------------------------------------- architecture
def describe_architecture(task: PixelLMTask) -> dict[str, Any]:
    """The readable summary of ``config.json``; :func:`load_pretrained` checks it matches."""
    tokens = [IMAGE_TOKEN, *task.codebook.tokens]
    lora = task.lmm.lora
    return {
        "num_scales": task.codebook.num_scales,  # L
        "tokens_per_scale": task.codebook.tokens_per_scale,  # N
        "fusion": task.codebook.fusion,
        "codebook_tokens": list(task.codebook.tokens),
        "token_ids": dict(zip(tokens, task.tokenizer.convert_tokens_to_ids(tokens), strict=True)),
        "vocab_size": len(task.tokenizer),
        "llm_hidden_size": task.lmm.hidden_size,  # H
        "decoder": type(task.decoder).__name__,
        "decoder_dim": task.decoder.dim,  # D
        "learned_scale_weights": getattr(task.decoder, "learn_scale_weights", None),
        "vision": type(task.vision).__name__,
        "vision_channels": task.vision.out_channels,  # C
        "image_size": task.vision.image_size,  # S
        "grid_size": task.vision.grid_size,
        "image_tokens": task.lmm.num_image_tokens(task.vision.grid_size),  # P
        "lora": None if lora is None else {**asdict(lora), "target_modules": list(lora.target_modules)},
    }


def instantiate_task(model_config: dict[str, Any]) -> PixelLMTask:
    """Build the task from a LightningCLI ``model`` section (``class_path`` + ``init_args``)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(PixelLMTask, "model", required=True)
    namespace = parser.parse_object({"model": model_config})
    return parser.instantiate(namespace).model


def architecture_section(model_config: dict[str, Any]) -> dict[str, Any]:
    """The components and tokenizer of a ``model`` section, and the settings that change what the
    model computes (``mask_image_padding``) or answers (``max_new_tokens``); training-only arguments dropped."""
    init = model_config["init_args"]
    kept = {k: copy.deepcopy(init[k]) for k in (*ARCHITECTURE_COMPONENTS, *MODEL_SETTINGS) if k in init}
    return {"class_path": model_config["class_path"], "init_args": kept}


# --------------------------------------------------------------------------------- weight split
def _component_init(model_config: dict[str, Any], name: str) -> dict[str, Any]:
    return model_config["init_args"][name].get("init_args", {})


def base_keys(task: PixelLMTask, model_config: dict[str, Any]) -> set[str]:
    """State-dict keys read from base checkpoints at load time instead of the folder.

    A frozen vision encoder built from ``pretrained`` (or a timm ``checkpoint``) comes whole from
    its base; under LoRA, the frozen entries of an LLM built from ``pretrained`` do.
    """
    state = task.state_dict(keep_vars=True)
    keys = set()
    vision = _component_init(model_config, "vision")
    if (vision.get("pretrained") or vision.get("checkpoint")) and not task.vision.trainable:
        keys |= {k for k in state if k.startswith("vision.")}
    if _component_init(model_config, "lmm").get("pretrained") and task.lmm.lora is not None:
        keys |= {
            k
            for k, v in state.items()
            if k.startswith("lmm.") and "lora_" not in k and not v.requires_grad
        }
    return keys


def adapter_keys(task: PixelLMTask) -> set[str]:
    """State-dict keys of the LoRA adapter (saved in peft's format under ``adapter/``)."""
    return {k for k in task.state_dict() if k.startswith("lmm.") and "lora_" in k}


def folder_keys(task: PixelLMTask, model_config: dict[str, Any]) -> set[str]:
    """The keys ``model.safetensors`` must hold for this task, exactly."""
    return set(task.state_dict()) - base_keys(task, model_config) - adapter_keys(task)


def _merged_llm(task: PixelLMTask) -> dict[str, Tensor]:
    """The LLaVA state dict (without ``lmm.llava.``) with every LoRA update added to its weight."""
    from peft.tuners.lora import LoraLayer

    state = {k: v for k, v in task.lmm.llava.state_dict().items() if "lora_" not in k}
    for name, module in task.lmm.llava.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            state[f"{name}.base_layer.weight"] = weight.detach() + module.get_delta_weight(ADAPTER_NAME).to(weight.dtype)
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def _merged_model_config(task: PixelLMTask, model_config: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` section of a merged folder: the LLM built from its config, without LoRA."""
    merged = copy.deepcopy(model_config)
    lmm = merged["init_args"]["lmm"]["init_args"]
    text_config = json.loads(task.lmm.llava.config.text_config.to_json_string(use_diff=True))
    text_config.pop("transformers_version", None)
    text_config.pop("model_type", None)
    lmm.update(pretrained=None, text_config=text_config, lora=None, gradient_checkpointing=False)
    return merged


# ------------------------------------------------------------------------------------- saving
def save_pretrained(
    task: PixelLMTask,
    directory: str | Path,
    model_config: dict[str, Any],
    preprocess: Preprocess,
    merge: bool = False,
) -> Path:
    """Write ``task`` as an exported folder (see the module docstring).

    Args:
        task: the trained task.
        directory: the folder to write (created; existing files of the format are replaced).
        model_config: the LightningCLI ``model`` section that built ``task``.
        preprocess: the image and text preprocessing the task was trained with.
        merge: add the LoRA update into the LLM weights and save the whole LLM (the folder then
            needs no base LLM and no peft at load time).

    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_config = architecture_section(model_config)
    for name, key in (("vision", "pretrained"), ("vision", "checkpoint"), ("lmm", "pretrained")):
        init = _component_init(model_config, name)  # base files a load reads: found from any working directory
        if init.get(key):
            init[key] = str(Path(init[key]).resolve())
    architecture = describe_architecture(task)
    state = {k: v.detach() for k, v in task.state_dict().items()}
    if merge:
        if task.lmm.lora is None:
            raise ValueError("--merge needs a model trained with LoRA (lmm.lora is null)")
        for key in [k for k in state if k.startswith("lmm.")]:
            del state[key]
        state.update({f"lmm.llava.{k}": v for k, v in _merged_llm(task).items()})
        model_config = _merged_model_config(task, model_config)
        architecture["lora"] = None
        from_base = base_keys(task, model_config)  # a frozen pretrained vision tower only
        saved = {k: v for k, v in sorted(state.items()) if k not in from_base}
        adapter = None
    else:
        saved = {k: state[k] for k in sorted(folder_keys(task, model_config))}
        adapter = _save_adapter(task, directory / ADAPTER_DIR) if task.lmm.lora is not None else None
    save_file({k: v.contiguous() for k, v in saved.items()}, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    task.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    model_config["init_args"]["tokenizer"] = TOKENIZER_DIR
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_config,
        "preprocess": asdict(preprocess),
        "architecture": architecture,
        "base_model": _component_init(model_config, "lmm").get("pretrained"),
        "vision_model": _component_init(model_config, "vision").get("pretrained"),
        "weights": {"file": WEIGHTS_NAME, "adapter": adapter, "merged_lora": merge, "tensors": len(saved)},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _save_adapter(task: PixelLMTask, directory: Path) -> str:
    """Write the LoRA adapter as peft's ``PeftModel.save_pretrained`` does; returns its folder name."""
    from peft import get_peft_model_state_dict

    llava = task.lmm.llava
    llava.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    state = get_peft_model_state_dict(llava, adapter_name=ADAPTER_NAME)
    save_file(
        {PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()},
        directory / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    return directory.name


# ------------------------------------------------------------------------------------ loading
def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of an exported folder, checked to be of this format."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pass a folder written by `pixellm export` or "
            "`pixellm convert-official`"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        found = (config.get("format"), config.get("format_version")) if isinstance(config, dict) else None
        raise ValueError(f"{path}: format/version {found}, expected {FORMAT!r} version {FORMAT_VERSION}")
    for section in ("model", "preprocess", "architecture", "weights"):
        if section not in config:
            raise ValueError(f"{path}: section {section!r} is missing")
    return config


def _use_base(init: dict[str, Any], given: str | None, option: str, path: Path) -> None:
    """Point ``init['pretrained']`` at ``given``, or check the recorded base is a local folder."""
    if given is not None:
        init["pretrained"] = str(given)
    elif init.get("pretrained") and not Path(init["pretrained"]).is_dir():
        raise FileNotFoundError(
            f"{path} builds on {init['pretrained']!r}, which is not a local folder here: "
            f"pass {option}=LOCAL_DIR (CLI: --{option.replace('_', '-')})"
        )


def folder_model_config(
    directory: str | Path, base_model: str | None = None, vision_model: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``config.json``, its ``model`` section with the tokenizer and base folders resolved).

    Args:
        directory: the folder.
        base_model: local LLaVA folder replacing the one recorded in ``config.json`` (needed
            when the folder keeps the LLM's base weights out, i.e. LoRA without merge).
        vision_model: local CLIP folder replacing the recorded one (a frozen pretrained tower).
    """
    directory = Path(directory)
    config = read_config(directory)
    model_config = architecture_section(config["model"])  # what an export writes: no optimizer, no other class
    init = model_config["init_args"]
    tokenizer = config["model"]["init_args"].get("tokenizer", TOKENIZER_DIR)
    init["tokenizer"] = str(folder_file(directory, tokenizer, "model.init_args.tokenizer"))
    config_path = directory / CONFIG_NAME
    _use_base(init["lmm"].setdefault("init_args", {}), base_model, "base_model", config_path)
    _use_base(init["vision"].setdefault("init_args", {}), vision_model, "vision_model", config_path)
    return config, model_config


def folder_file(directory: Path, relative: str, field: str) -> Path:
    """``directory / relative``, a file of the folder its ``config.json`` names: never one outside it.

    Raises:
        ValueError: an absolute path, a ``..`` component or a drive letter (names the field).
    """
    try:
        return confined_path(directory, relative)
    except DataError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: field {field!r}: {relative!r} is not a path inside the folder") from err


def load_folder_weights(task: PixelLMTask, directory: str | Path, model_config: dict[str, Any]) -> None:
    """Check ``task`` is the architecture of the folder and load its weights and adapter, strictly."""
    directory = Path(directory)
    config = read_config(directory)
    config_path = directory / CONFIG_NAME
    _check_architecture(describe_architecture(task), config["architecture"], config_path)
    _load_weights(task, folder_file(directory, config["weights"]["file"], "weights.file"), folder_keys(task, model_config))
    if config["weights"].get("adapter"):
        _load_adapter(task, folder_file(directory, config["weights"]["adapter"], "weights.adapter"))
    elif adapter_keys(task):
        raise ValueError(f"{config_path}: the model has LoRA but weights.adapter names no folder")


def load_pretrained(
    directory: str | Path, base_model: str | None = None, vision_model: str | None = None
) -> PretrainedModel:
    """Build the task an exported folder describes and load its weights, strictly.

    Args:
        directory: the folder.
        base_model: local LLaVA folder replacing the recorded one (see :func:`folder_model_config`).
        vision_model: local CLIP folder replacing the recorded one.

    Raises:
        FileNotFoundError: a file of the folder or a base checkpoint is missing.
        ValueError: the weights or the tokenizer do not match the config (names the keys).
    """
    config, model_config = folder_model_config(directory, base_model, vision_model)
    task = instantiate_task(model_config)
    load_folder_weights(task, directory, model_config)
    task.eval()
    return PretrainedModel(task, Preprocess(**config["preprocess"]), Path(directory))


def _check_architecture(built: dict[str, Any], recorded: dict[str, Any], path: Path) -> None:
    """Raise when what ``model`` builds differs from the recorded summary (names the fields)."""
    differ = {k: (built.get(k), recorded.get(k)) for k in built.keys() | recorded.keys() if built.get(k) != recorded.get(k)}
    if differ:
        lines = "; ".join(f"{k}: built {b!r}, recorded {r!r}" for k, (b, r) in sorted(differ.items()))
        raise ValueError(f"{path}: the 'model' section does not build the recorded architecture: {lines}")


def _describe_keys(keys: set[str], limit: int = 20) -> str:
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _load_weights(task: PixelLMTask, path: Path, expected: set[str]) -> None:
    """Load ``path`` into ``task``: its keys must be exactly ``expected`` with matching shapes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file missing")
    weights = load_weight_file(path)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = expected - shapes.keys(), shapes.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the config: missing keys [{_describe_keys(missing)}]; "
            f"unexpected keys [{_describe_keys(unexpected)}]"
        )
    state = task.state_dict()
    wrong = {k: (s, tuple(state[k].shape)) for k, s in shapes.items() if s != tuple(state[k].shape)}
    if wrong:
        lines = "; ".join(f"{k}: file {f}, config builds {c}" for k, (f, c) in sorted(wrong.items())[:20])
        raise ValueError(f"{path}: the config builds other shapes than the weights: {lines}")
    task.load_state_dict(weights, strict=False)


def _load_adapter(task: PixelLMTask, directory: Path) -> None:
    """Load a peft-format LoRA adapter into the task's LLM, strictly."""
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

    lora = task.lmm.lora
    if lora is None:
        raise ValueError(f"{directory}: the folder has a LoRA adapter but the config has lmm.lora null")
    saved = LoraConfig.from_pretrained(str(directory))
    settings = {"r": (saved.r, lora.r), "lora_alpha": (saved.lora_alpha, lora.alpha)}
    settings["target_modules"] = (saved.target_modules, lora.pattern())
    differ = {k: v for k, v in settings.items() if v[0] != v[1]}
    if differ:
        raise ValueError(f"{directory}/adapter_config.json differs from config.json lmm.lora: {differ}")
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter weights missing")
    state = {re.sub(f"^{re.escape(PEFT_PREFIX)}", "", k): v for k, v in load_weight_file(path).items()}
    expected = get_peft_model_state_dict(task.lmm.llava, adapter_name=ADAPTER_NAME)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the config: missing keys [{_describe_keys(missing)}]; "
            f"unexpected keys [{_describe_keys(unexpected)}]; other shapes [{_describe_keys(set(wrong))}]"
        )
    with torch.no_grad():
        set_peft_model_state_dict(task.lmm.llava, state, adapter_name=ADAPTER_NAME)
