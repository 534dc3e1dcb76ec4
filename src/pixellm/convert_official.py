"""``pixellm convert-official SRC DST``: the released PixelLM checkpoints -> an exported folder.

    pixellm convert-official checkpoints/PixelLM-7B models/pixellm-7b \\
        --vision-model checkpoints/clip-vit-large-patch14-336

SRC is the released Hugging Face-style folder (weights and config under ``SRC/hf_model/`` or in
SRC itself; ``*.safetensors`` or ``pytorch_model*.bin``, read with ``weights_only=True``). Its
LoRA is already merged, so the whole LLM is converted; the CLIP tower is not in the release and
is rebuilt from ``--vision-model``.

The converted model reproduces the release (facts in REFERENCE.md): token fusion ``"release"``
(each scale sums its N states times 1/(L*N)), gamma fixed at 1/L, CLIP's position embeddings
resized with the release's off-by-one (``release_position_quirk``), ImageNet/SAM normalisation,
separate projectors (p_V->T Linear(C, 2H) -> GELU -> Linear(2H, H), and ``out_mm_projector`` +
``image_feature_neck`` for p_V->D), the LLaVA v1 template, with the image between ``<im_start>``
and ``<im_end>`` when the release's tokenizer holds them (its default ``use_mm_start_end``). Widths
and depths are read from the weights' shapes; the attention heads of the decoder (8) are the
release's constant.

Every source key is mapped or dropped for a stated reason (``DST/conversion.json`` lists both);
a key that is neither, or a model key that nothing fills, stops the conversion.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig

from pixellm.data.conversation import IM_END, IM_START
from pixellm.data.preprocess import DEFAULT_PIXEL_MEAN, DEFAULT_PIXEL_STD
from pixellm.export import Preprocess, folder_keys, instantiate_task, save_pretrained
from pixellm.reliability.checkpoint_io import load_weight_file

RELEASE_DECODER_HEADS = 8  # MaskDecoderMultiScale's TwoWayTransformer(num_heads=8)
RELEASE_TOKEN = re.compile(r"^\[SEG(\d+)\]$")
LLM = "lmm.llava.model.language_model."

# (source pattern, target replacement), first match wins, after DROPPED
KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.(embed_tokens|layers|norm)\.", LLM + r"\1."),
    (r"^lm_head\.", "lmm.llava.lm_head."),
    (r"^model\.mm_projector\.0\.", "lmm.llava.model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "lmm.llava.model.multi_modal_projector.linear_2."),
    (r"^model\.out_mm_projector\.([02])\.", r"projection.mlp.\1."),
    (r"^model\.image_feature_neck\.", "projection.neck."),
    (r"^model\.text_hidden_fcs\.0\.([02])\.", r"codebook.project.\1."),
    (r"^model\.mask_decoder\.transformer\.(\d+)\.(.*)\.mlp\.lin1\.", r"decoder.transformers.\1.\2.mlp.layers.0."),
    (r"^model\.mask_decoder\.transformer\.(\d+)\.(.*)\.mlp\.lin2\.", r"decoder.transformers.\1.\2.mlp.layers.1."),
    (r"^model\.mask_decoder\.transformer\.", "decoder.transformers."),
    (r"^model\.mask_decoder\.(iou_token|mask_tokens|level_embed|output_hypernetworks_mlps)\.", r"decoder.\1."),
    (r"^model\.mask_decoder\.output_upscaling\.([01])\.", r"decoder.output_upscaling.0.\1."),
    (r"^model\.mask_decoder\.upsample_2x\.([01])\.", r"decoder.feature_upsamplers.1.0.\1."),
    (r"^model\.mask_decoder\.pe1\.positional_encoding_gaussian_matrix$", "decoder.positional_encodings.1.gaussian"),
    (r"^model\.prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "decoder.positional_encodings.0.gaussian"),
    (r"^model\.prompt_encoder\.no_mask_embed\.", "decoder.no_mask_embed."),
]
# (source pattern, why it is not converted)
DROPPED: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.", "CLIP tower: rebuilt from --vision-model"),
    (r"^model\.mask_decoder\.iou_prediction_head\.", "IoU head: the release never uses its output"),
    (r"^model\.prompt_encoder\.(point_embeddings|not_a_point_embed|mask_downscaling)\.",
     "point/box/mask prompts: PixelLM prompts with codebook embeddings only"),
    (r"\.rotary_emb\.inv_freq$", "rotary frequencies: recomputed by the LLM"),
]


def hf_folder(source: Path) -> Path:
    """The folder that holds the release's ``config.json`` (``SRC/hf_model`` or SRC)."""
    for folder in (source / "hf_model", source):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{source}: no config.json in {source / 'hf_model'} or {source}")


def read_release_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the release's weight files (safetensors preferred; .bin via weights_only)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_weight_file(f).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    return {k: v for f in files for k, v in load_weight_file(f).items()}


def map_key(key: str) -> tuple[str | None, str | None]:
    """(our key, None) for a converted key, (None, reason) for a dropped one, (None, None) else."""
    for pattern, reason in DROPPED:
        if re.search(pattern, key):
            return None, reason
    for pattern, replacement in KEY_MAP:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key), None
    return None, None


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """How many distinct integers ``pattern``'s group captures over the keys."""
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def release_model_config(
    state: dict[str, Tensor],
    release_config: dict[str, Any],
    num_tokens: int,
    vision_model: str,
    image_size: int,
    image_pool_size: int,
    feature_layers: list[int],
) -> dict[str, Any]:
    """Our ``model`` section for the release, widths and depths read from the weight shapes."""
    hidden = state["model.embed_tokens.weight"].shape[1]  # H
    num_scales = state["model.mask_decoder.level_embed.weight"].shape[0]  # L
    dim = state["model.mask_decoder.iou_token.weight"].shape[1]  # D
    block = "model.mask_decoder.transformer.0.layers.0."
    llama_fields = LlamaConfig().to_dict().keys() - {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}
    text_config = {k: v for k, v in release_config.items() if k in llama_fields}
    text_config["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    vision_channels = state["model.mm_projector.0.weight"].shape[1]  # C
    component = "pixellm.model."
    return {
        "class_path": "pixellm.task.PixelLMTask",
        "init_args": {
            "vision": {"class_path": component + "vision.CLIPVisionEncoder", "init_args": {
                "pretrained": vision_model, "image_size": image_size, "feature_layers": feature_layers,
                "trainable": False, "release_position_quirk": True}},
            "lmm": {"class_path": component + "lmm.LlavaLMM", "init_args": {
                "text_config": text_config, "vision_channels": vision_channels,
                "image_pool_size": image_pool_size,
                "projector_hidden_size": state["model.mm_projector.0.weight"].shape[0]}},
            "codebook": {"class_path": component + "codebook.SegmentationCodebook", "init_args": {
                "hidden_size": hidden, "decoder_dim": state["model.text_hidden_fcs.0.2.weight"].shape[0],
                "num_scales": num_scales, "tokens_per_scale": num_tokens // num_scales, "fusion": "release"}},
            "projection": {"class_path": component + "projection.VisionDecoderProjection", "init_args": {
                "in_channels": vision_channels, "out_channels": state["model.image_feature_neck.0.weight"].shape[0],
                "mlp_dim": state["model.out_mm_projector.0.weight"].shape[0],
                "embed_dim": state["model.out_mm_projector.2.weight"].shape[0]}},
            "decoder": {"class_path": component + "decoder.CascadedPixelDecoder", "init_args": {
                "num_scales": num_scales, "dim": dim,
                "depth": _count(state, r"^model\.mask_decoder\.transformer\.0\.layers\.(\d+)\."),
                "num_heads": RELEASE_DECODER_HEADS,
                "mlp_dim": state[block + "mlp.lin1.weight"].shape[0],
                "attention_downsample": dim // state[block + "cross_attn_token_to_image.q_proj.weight"].shape[0],
                "num_mask_tokens": state["model.mask_decoder.mask_tokens.weight"].shape[0],
                "hypernet_layers": _count(state, r"^model\.mask_decoder\.output_hypernetworks_mlps\.0\.layers\.(\d+)\."),
                "learn_scale_weights": False}},
            "tokenizer": "",  # set by the caller
            "max_new_tokens": 512,
        },
    }


def release_tokens(folder: Path) -> tuple[int, str]:
    """How many ``[SEGi]`` tokens the release's tokenizer holds (L*N; 6 for PixelLM), and the template of
    its prompts: ``llava_v1_im_start_end`` when it holds ``<im_start>`` and ``<im_end>`` (the release's
    merge script adds them for ``use_mm_start_end``, its default), else ``llava_v1``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    vocabulary = tokenizer.get_vocab()
    found = sorted(int(m.group(1)) for t in vocabulary if (m := RELEASE_TOKEN.match(t)))
    if not found or found != list(range(len(found))):
        raise ValueError(f"{folder}: the tokenizer's codebook tokens are {found}, expected [SEG0]..[SEG<n>]")
    template = "llava_v1_im_start_end" if {IM_START, IM_END} <= vocabulary.keys() else "llava_v1"
    return len(found), template


def convert_state(
    source: dict[str, Tensor], target: dict[str, Tensor], expected: set[str]
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str], dict[str, int]]:
    """Map the release's tensors onto our keys.

    Rows of ``embed_tokens`` / ``lm_head`` for tokens the release lacks (the image token) are
    zero (the image token is replaced by image features and a zero logit is never the argmax of
    a trained LLM in practice).

    Returns:
        (our state, source -> our key, source -> reason dropped, our key -> rows added).

    Raises:
        ValueError: unmapped source keys, unfilled or unexpected targets, or other shapes.
    """
    converted, mapped, dropped, added = {}, {}, {}, {}
    unknown = []
    for key, tensor in source.items():
        ours, reason = map_key(key)
        if reason is not None:
            dropped[key] = reason
        elif ours is None:
            unknown.append(key)
        else:
            mapped[key], converted[ours] = ours, tensor
    missing, unexpected = expected - converted.keys(), converted.keys() - expected
    if unknown or missing or unexpected:
        raise ValueError(
            f"release keys neither mapped nor dropped: {sorted(unknown)[:20]}; model keys nothing fills: "
            f"{sorted(missing)[:20]}; mapped keys the model lacks: {sorted(unexpected)[:20]}"
        )
    for key in (LLM + "embed_tokens.weight", "lmm.llava.lm_head.weight"):
        rows = target[key].shape[0] - converted[key].shape[0]
        if rows > 0:
            converted[key] = torch.cat([converted[key], converted[key].new_zeros(rows, converted[key].shape[1])])
            added[key] = rows
    wrong = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape}
    if wrong:
        raise ValueError(f"release shapes differ from the model built for them: {wrong}")
    return converted, mapped, dropped, added


def convert_official(
    source: Path,
    destination: Path,
    vision_model: str,
    image_size: int = 448,
    image_pool_size: int = 16,
    feature_layers: tuple[int, ...] = (-2, -11),
) -> Path:
    """Convert a released checkpoint folder into an exported folder (see the module docstring).

    Args:
        source: the release's folder (``hf_model/`` inside or the folder itself).
        destination: the folder to write.
        vision_model: local CLIP ViT-L/14-336 folder (``save_pretrained`` format).
        image_size: input side (the release: 448).
        image_pool_size: side of the pooled image-token grid (the release: 32 -> 16).
        feature_layers: CLIP hidden states of the scales (the release: -2, -11).
    """
    folder = hf_folder(source)
    release_config = json.loads((folder / "config.json").read_text())
    state = read_release_weights(folder)
    codebook_tokens, template = release_tokens(folder)
    model_config = release_model_config(
        state, release_config, codebook_tokens, vision_model, image_size, image_pool_size, list(feature_layers)
    )
    model_config["init_args"]["tokenizer"] = str(folder)
    task = instantiate_task(model_config)
    converted, mapped, dropped, added = convert_state(
        state, task.state_dict(), folder_keys(task, model_config)
    )
    task.load_state_dict(converted, strict=False)
    preprocess = Preprocess(image_size, DEFAULT_PIXEL_MEAN, DEFAULT_PIXEL_STD, template)
    save_pretrained(task.eval(), destination, model_config, preprocess)
    report = {"source": str(folder), "mapped": mapped, "dropped": dropped, "zero_rows_added": added}
    (destination / "conversion.json").write_text(json.dumps(report, indent=1) + "\n")
    return destination


def convert_official_command(argv: list[str]) -> None:
    """Run ``pixellm convert-official`` with the arguments after the sub-command."""
    parser = argparse.ArgumentParser(prog="pixellm convert-official", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="released PixelLM folder (with hf_model/)")
    parser.add_argument("destination", type=Path, help="folder to write")
    parser.add_argument("--vision-model", required=True, help="local CLIP ViT-L/14-336 folder")
    parser.add_argument("--image-size", type=int, default=448, help="input side (release: 448)")
    parser.add_argument("--image-pool-size", type=int, default=16, help="image-token grid side (release: 16)")
    parser.add_argument("--feature-layers", type=int, nargs="+", default=[-2, -11], help="CLIP layers per scale")
    args = parser.parse_args(argv)
    out = convert_official(args.source, args.destination, args.vision_model, args.image_size,
                           args.image_pool_size, tuple(args.feature_layers))
    report = json.loads((out / "conversion.json").read_text())
    print(f"converted {len(report['mapped'])} tensors, dropped {len(report['dropped'])} into {out}")
