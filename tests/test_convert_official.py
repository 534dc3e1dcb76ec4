"""`pixellm convert-official`: a tiny fake release with the released key names and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from trained_tiny import random_image
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from pixellm.export import CONFIG_NAME, load_pretrained
from pixellm.inference.predictor import Predictor, Request
from pixellm.main import main
from pixellm.tokenizer import IMAGE_TOKEN, _shapes_tokenizer

H, C, D = 32, 32, 16  # LLM width, CLIP width, decoder width (the release: 4096, 1024, 256)


def linear(out_dim: int, in_dim: int, bias: bool = True) -> dict[str, torch.Tensor]:
    weights = {"weight": torch.randn(out_dim, in_dim)}
    return {**weights, "bias": torch.randn(out_dim)} if bias else weights


def named(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def sam_attention(dim: int, inner: int) -> dict[str, torch.Tensor]:
    return {**named("q_proj", linear(inner, dim)), **named("k_proj", linear(inner, dim)),
            **named("v_proj", linear(inner, dim)), **named("out_proj", linear(dim, inner))}


def layer_norm(dim: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.rand(dim) + 0.5, "bias": torch.randn(dim)}


def two_way_transformer(depth: int = 2, mlp: int = 64) -> dict[str, torch.Tensor]:
    """SAM's TwoWayTransformer names (attention downsample 2 on the cross attentions)."""
    state = {}
    for i in range(depth):
        block = {**named("self_attn", sam_attention(D, D)), **named("norm1", layer_norm(D)),
                 **named("cross_attn_token_to_image", sam_attention(D, D // 2)), **named("norm2", layer_norm(D)),
                 **named("mlp.lin1", linear(mlp, D)), **named("mlp.lin2", linear(D, mlp)),
                 **named("norm3", layer_norm(D)), **named("norm4", layer_norm(D)),
                 **named("cross_attn_image_to_token", sam_attention(D, D // 2))}
        state.update(named(f"layers.{i}", block))
    return {**state, **named("final_attn_token_to_image", sam_attention(D, D // 2)),
            **named("norm_final_attn", layer_norm(D))}


def mlp3(out_dim: int) -> dict[str, torch.Tensor]:
    return {**named("layers.0", linear(D, D)), **named("layers.1", linear(D, D)), **named("layers.2", linear(out_dim, D))}


def fake_release(folder: Path) -> dict[str, torch.Tensor]:
    """The key names and shapes of a released PixelLM hf_model (model/PixelLM.py, llava_arch.py)."""
    torch.manual_seed(0)
    tokenizer = _shapes_tokenizer()
    tokenizer.add_tokens([f"[SEG{i}]" for i in range(6)])  # as the release's training script does
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)  # and its merge script (use_mm_start_end)
    tokenizer.save_pretrained(folder)
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    config = {**llama.to_dict(), "architectures": ["PixelLMForCausalLM"], "model_type": "llava",
              "mm_hidden_size": C, "out_dim": D, "image_feature_scale_num": 2, "separate_mm_projector": True,
              "resize_vision_tower_size": 448, "vision_tower": "openai/clip-vit-large-patch14"}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: torch.randn_like(v) for k, v in LlamaForCausalLM(llama).state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)  # older transformers saved it
    decoder = {
        **named("transformer.0", two_way_transformer()), **named("transformer.1", two_way_transformer()),
        "iou_token.weight": torch.randn(1, D), "mask_tokens.weight": torch.randn(4, D),
        "output_upscaling.0.weight": torch.randn(D, D // 8, 2, 2), "output_upscaling.0.bias": torch.randn(D // 8),
        **named("output_upscaling.1", layer_norm(D // 8)),
        "upsample_2x.0.weight": torch.randn(D, D, 2, 2), "upsample_2x.0.bias": torch.randn(D),
        **named("upsample_2x.1", layer_norm(D)),
        "pe1.positional_encoding_gaussian_matrix": torch.randn(2, D // 2),
        **{k: v for i in range(4) for k, v in named(f"output_hypernetworks_mlps.{i}", mlp3(D // 8)).items()},
        **named("iou_prediction_head", mlp3(4)), "level_embed.weight": torch.randn(2, D),
    }
    prompt = {
        "pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, D // 2),
        **{f"point_embeddings.{i}.weight": torch.randn(1, D) for i in range(4)},
        "not_a_point_embed.weight": torch.randn(1, D), "no_mask_embed.weight": torch.randn(1, D),
        "mask_downscaling.0.weight": torch.randn(4, 1, 2, 2), "mask_downscaling.0.bias": torch.randn(4),
        **named("mask_downscaling.1", layer_norm(4)),
        "mask_downscaling.3.weight": torch.randn(16, 4, 2, 2), "mask_downscaling.3.bias": torch.randn(16),
        **named("mask_downscaling.4", layer_norm(16)),
        "mask_downscaling.6.weight": torch.randn(D, 16, 1, 1), "mask_downscaling.6.bias": torch.randn(D),
    }
    state.update({
        **named("model.mask_decoder", decoder), **named("model.prompt_encoder", prompt),
        **named("model.mm_projector.0", linear(2 * H, C)), **named("model.mm_projector.2", linear(H, 2 * H)),
        **named("model.out_mm_projector.0", linear(2 * H, C)), **named("model.out_mm_projector.2", linear(H, 2 * H)),
        "model.image_feature_neck.0.weight": torch.randn(D, H, 1, 1), **named("model.image_feature_neck.1", layer_norm(D)),
        "model.image_feature_neck.2.weight": torch.randn(D, D, 3, 3), **named("model.image_feature_neck.3", layer_norm(D)),
        **named("model.text_hidden_fcs.0.0", linear(H, H)), **named("model.text_hidden_fcs.0.2", linear(D, H)),
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(C),
    })
    half = sorted(state)[: len(state) // 2]  # two shards, as released checkpoints are
    save_file({k: state[k] for k in half}, folder / "model-00001-of-00002.safetensors")
    save_file({k: v for k, v in state.items() if k not in half}, folder / "model-00002-of-00002.safetensors")
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    (root / "PixelLM-tiny" / "hf_model").mkdir(parents=True)
    source = fake_release(root / "PixelLM-tiny" / "hf_model")
    clip = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=C, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2,
                                     patch_size=8, image_size=24)).save_pretrained(clip)
    out = root / "converted"
    main(["convert-official", str(root / "PixelLM-tiny"), str(out), "--vision-model", str(clip),
          "--image-size", "32", "--image-pool-size", "2"])
    return source, out, clip


def test_every_release_key_is_mapped_or_dropped_and_every_model_key_is_filled(converted):
    source, out, _ = converted
    report = json.loads((out / "conversion.json").read_text())
    assert report["mapped"].keys() | report["dropped"].keys() == source.keys()
    assert not report["mapped"].keys() & report["dropped"].keys()
    assert len([k for k in report["dropped"] if k.startswith("model.prompt_encoder")]) == 15  # 4+1+10
    assert len([k for k in report["dropped"] if "iou_prediction_head" in k]) == 6
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in report["dropped"]
    assert report["zero_rows_added"] == {"lmm.llava.model.language_model.embed_tokens.weight": 1,
                                         "lmm.llava.lm_head.weight": 1}  # the image token

    task = load_pretrained(out, vision_model=None).task
    state = task.state_dict()
    filled = set(report["mapped"].values())
    assert filled == {k for k in state if not k.startswith("vision.")}  # nothing left over either way
    for ours, theirs in [("decoder.transformers.1.layers.0.mlp.layers.0.weight", "model.mask_decoder.transformer.1.layers.0.mlp.lin1.weight"),
                         ("decoder.feature_upsamplers.1.0.1.bias", "model.mask_decoder.upsample_2x.1.bias"),
                         ("decoder.positional_encodings.0.gaussian", "model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
                         ("lmm.llava.model.multi_modal_projector.linear_1.weight", "model.mm_projector.0.weight"),
                         ("codebook.project.2.weight", "model.text_hidden_fcs.0.2.weight")]:
        assert torch.equal(state[ours], source[theirs])
    rows = source["model.embed_tokens.weight"].shape[0]
    assert torch.equal(state["lmm.llava.lm_head.weight"][:rows], source["lm_head.weight"])
    assert not state["lmm.llava.lm_head.weight"][rows:].any()


def test_the_converted_model_has_the_release_switches_and_runs(converted):
    _, out, clip = converted
    config = json.loads((out / CONFIG_NAME).read_text())
    init = config["model"]["init_args"]
    assert init["codebook"]["init_args"]["fusion"] == "release"
    assert init["decoder"]["init_args"]["learn_scale_weights"] is False
    assert init["vision"]["init_args"]["release_position_quirk"] is True
    assert init["vision"]["init_args"]["feature_layers"] == [-2, -11]
    assert config["preprocess"]["pixel_mean"] == [123.675, 116.28, 103.53]
    assert config["preprocess"]["template"] == "llava_v1_im_start_end"
    assert config["vision_model"] == str(clip)
    model = load_pretrained(out)
    assert model.task.decoder.scale_weights().tolist() == [0.5, 0.5]
    predictor = Predictor(model, max_new_tokens=4)
    prediction = predictor.predict([Request(random_image(0, (40, 30)), "what is this?")])[0]
    assert isinstance(prediction.text, str) and prediction.masks.shape[1:] == (30, 40)
    ids = predictor._batch([Request(random_image(0, (40, 30)), "what is this?")])["input_ids"][0].tolist()
    start, image, end = model.task.tokenizer.convert_tokens_to_ids(["<im_start>", IMAGE_TOKEN, "<im_end>"])
    assert ids[ids.index(image) - 1 : ids.index(image) + 2] == [start, image, end]  # the release's prompt


def test_a_release_key_that_nothing_maps_stops_the_conversion():
    from pixellm.convert_official import convert_state

    with pytest.raises(ValueError, match=r"neither mapped nor dropped: \['model\.new_head\.weight'\]"):
        convert_state({"model.new_head.weight": torch.zeros(1)}, {}, set())


def test_a_truncated_release_weight_file_is_named(tmp_path):
    from pixellm.convert_official import read_release_weights
    from pixellm.reliability.checkpoint_io import CheckpointError

    save_file({"w": torch.ones(64)}, tmp_path / "model-00001-of-00001.safetensors")
    assert torch.equal(read_release_weights(tmp_path)["w"], torch.ones(64))
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: not a loadable checkpoint .*copy it again"):
        read_release_weights(tmp_path)
    shard.unlink()
    torch.save({"w": torch.ones(64)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(read_release_weights(tmp_path)["w"], torch.ones(64))
    binary = tmp_path / "pytorch_model.bin"
    binary.write_bytes(binary.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a loadable checkpoint"):
        read_release_weights(tmp_path)
