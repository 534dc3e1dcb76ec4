"""LLaVA side: image splicing, answer-only CE, greedy generation with a KV cache, LoRA scope."""

import pytest
import torch
import torch.nn.functional as F

from pixellm.model.lmm import LlavaLMM, LoraSettings

TEXT = dict(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
)
IMAGE_ID = 39


def make(**kwargs) -> LlavaLMM:
    torch.manual_seed(0)
    return LlavaLMM(text_config=TEXT, vision_channels=8, **kwargs).eval()


def test_build_inputs_splices_image_tokens_at_the_placeholder():
    lmm = make()
    ids = torch.tensor([[1, 5, IMAGE_ID, 6, 7], [0, 1, IMAGE_ID, 8, 2]])  # row 1 left padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, -100, 8, 2]])
    image = torch.randn(2, 3, 32)
    inputs = lmm.build_inputs(ids, mask, image, IMAGE_ID, labels)
    assert inputs.inputs_embeds.shape == (2, 7, 32)
    assert inputs.token_ids.tolist() == [[1, 5, 39, 39, 39, 6, 7], [0, 1, 39, 39, 39, 8, 2]]
    assert inputs.labels.tolist()[0] == [-100, -100, -100, -100, -100, 6, 7]
    assert inputs.attention_mask.tolist()[1] == [0, 1, 1, 1, 1, 1, 1]
    assert inputs.position_ids.tolist()[1] == [0, 0, 1, 2, 3, 4, 5]
    assert torch.equal(inputs.inputs_embeds[1, 2:5], image[1])
    assert torch.equal(inputs.inputs_embeds[0, 6], lmm.embed_tokens.weight[7])


def test_build_inputs_needs_one_image_token_per_row():
    lmm = make()
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="exactly one image token"):
        lmm.build_inputs(ids, torch.ones_like(ids), torch.randn(1, 2, 32), IMAGE_ID)


def test_answer_only_ce_equals_full_vocabulary_ce():
    lmm = make()
    ids = torch.tensor([[1, IMAGE_ID, 4, 9, 12, 2]])
    labels = torch.tensor([[-100, -100, -100, 9, 12, 2]])
    inputs = lmm.build_inputs(ids, torch.ones_like(ids), torch.randn(1, 4, 32), IMAGE_ID, labels)
    hidden = lmm(inputs)
    logits = lmm.lm_head(hidden)
    expected = F.cross_entropy(logits[0, :-1], inputs.labels[0, 1:], ignore_index=-100)
    assert lmm.next_token_loss(hidden, inputs.labels).item() == pytest.approx(expected.item(), rel=1e-5)


def greedy_without_cache(lmm: LlavaLMM, ids: torch.Tensor, image: torch.Tensor, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
        token = lmm.lm_head(lmm(inputs)[:, -1]).argmax(-1)
        out.append(int(token))
        ids = torch.cat([ids, token[:, None]], 1)
    return out


def test_kv_cache_generation_equals_recomputation_and_batching():
    lmm = make()
    image = torch.randn(2, 4, 32)
    prompts = [torch.tensor([[1, IMAGE_ID, 4, 9]]), torch.tensor([[1, 5, 6, IMAGE_ID, 3, 8]])]
    singles = []
    for prompt, img in zip(prompts, image, strict=False):
        inputs = lmm.build_inputs(prompt, torch.ones_like(prompt), img[None], IMAGE_ID)
        ids, states = lmm.generate(inputs, max_new_tokens=6, eos_token_id=-1)
        assert ids[0].tolist() == greedy_without_cache(lmm, prompt, img[None], 6)
        assert states.shape == (1, 6, 32)
        singles.append(ids[0].tolist())
    # left-padded batch gives the same tokens
    batch = torch.tensor([[0, 0, 1, IMAGE_ID, 4, 9], [1, 5, 6, IMAGE_ID, 3, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ids, _ = lmm.generate(lmm.build_inputs(batch, mask, image, IMAGE_ID), 6, eos_token_id=-1)
    assert ids.tolist() == singles


def test_generation_runs_the_llm_once_per_fed_token():
    lmm = make()
    prompt = torch.tensor([[1, IMAGE_ID, 4]])
    inputs = lmm.build_inputs(prompt, torch.ones_like(prompt), torch.randn(1, 4, 32), IMAGE_ID)
    lengths = []  # sequence length of every call of the first layer's query projection
    lmm.language_model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    ids, _ = lmm.generate(inputs, max_new_tokens=5, eos_token_id=-1)
    assert ids.shape == (1, 5)
    assert lengths == [3 + 4 - 1, 1, 1, 1, 1]  # the prefill (image token -> 4 embeddings), then 4 fed tokens: the 5th is not


def test_generation_stops_at_eos_and_pads_with_it():
    lmm = make()
    prompt = torch.tensor([[1, IMAGE_ID, 4]])
    inputs = lmm.build_inputs(prompt, torch.ones_like(prompt), torch.randn(1, 4, 32), IMAGE_ID)
    first, _ = lmm.generate(inputs, max_new_tokens=3, eos_token_id=-1)
    eos = int(first[0, 1])  # pretend the second generated token is end-of-sequence
    ids, _ = lmm.generate(inputs, max_new_tokens=8, eos_token_id=eos)
    assert ids.shape[1] == 2 or (ids[0, 2:] == eos).all()


class AnswerLoss(torch.nn.Module):
    """Image splicing, LLM and answer-only loss in one forward, as a training step runs them."""

    def __init__(self, lmm: LlavaLMM) -> None:
        super().__init__()
        self.lmm = lmm

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        inputs = self.lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID, labels)
        return self.lmm.next_token_loss(self.lmm(inputs), inputs.labels)


def lora_step(step: torch.nn.Module) -> None:
    """One backward of :class:`AnswerLoss` (or of it wrapped by FSDP) on a sequence with 2 added tokens."""
    ids = torch.tensor([[1, IMAGE_ID, 41, 42, 3]])
    labels = torch.tensor([[-100, -100, 41, 42, 3]])
    step(ids, labels, torch.randn(1, 2, 32)).backward()


def test_lora_hits_only_the_language_model_and_new_rows_learn():
    lmm = make(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    lmm.extend_vocabulary(44)  # 4 added tokens
    names = [n for n, p in lmm.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names)
    assert all("language_model" in n for n in names if "lora_" in n)
    assert not any("mlp" in n and "lora" not in n for n in names)
    lora_step(AnswerLoss(lmm))
    grad = lmm.embed_tokens.weight.grad
    assert grad[:40].abs().sum() == 0 and grad[41].abs().sum() > 0
    assert lmm.lm_head.weight.grad[:40].abs().sum() == 0 and lmm.lm_head.weight.grad[42].abs().sum() > 0


def test_base_rows_stay_frozen_under_fsdp(tmp_path):
    """FSDP swaps parameters for views of its flat parameter, which drops hooks on them: the rule must hold."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        lmm = make(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        lmm.extend_vocabulary(44)
        wrapped = FullyShardedDataParallel(AnswerLoss(lmm), use_orig_params=True, device_id=torch.device("cpu"))
        lora_step(wrapped)
        grads = {name: p.grad for name, p in wrapped.named_parameters() if p.grad is not None}
        embed = next(g for n, g in grads.items() if n.endswith("embed_tokens.weight"))
        head = next(g for n, g in grads.items() if n.endswith("lm_head.weight"))
        assert embed[:40].abs().sum() == 0 and embed[41].abs().sum() > 0
        assert head[:40].abs().sum() == 0 and head[42].abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_from_pretrained_loads_a_local_llava_folder(tmp_path):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    config = LlavaConfig(
        text_config=LlamaConfig(**TEXT),
        vision_config=CLIPVisionConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1, intermediate_size=16),
    )
    LlavaForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path / "llava")  # as released
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", dtype=torch.float32)
    lmm = LlavaLMM(pretrained=str(tmp_path / "llava"))
    assert {p.dtype for p in lmm.parameters()} == {torch.float32}  # as the vision encoder, codebook, decoder
    assert lmm.embed_image(torch.randn(1, 8, 2, 2)).dtype == torch.float32
    assert lmm.llava.model.vision_tower is None  # replaced by pixellm's own multi-scale encoder
    assert torch.equal(lmm.embed_tokens.weight, saved.model.language_model.embed_tokens.weight)
    assert torch.equal(lmm.projector.linear_1.weight, saved.model.multi_modal_projector.linear_1.weight)
    with pytest.raises(ValueError, match="exactly one"):
        LlavaLMM(pretrained=str(tmp_path / "llava"), text_config=TEXT)
    with pytest.raises(OSError):
        LlavaLMM(pretrained=str(tmp_path / "missing"))


def test_compiled_layers_match_the_plain_model_and_train():
    ids = torch.tensor([[1, IMAGE_ID, 41, 42, 3]])
    labels = torch.tensor([[-100, -100, 41, 42, 3]])
    image = torch.randn(1, 2, 32)
    losses, grads = [], []
    for compile_layers in (False, True):
        lmm = make(lora=LoraSettings(r=4, alpha=8, dropout=0.0), compile_layers=compile_layers)
        lmm.extend_vocabulary(44)
        loss = AnswerLoss(lmm)(ids, labels, image)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lmm.embed_tokens.weight.grad[41].clone())
    assert lmm.language_model.layers[0]._compiled_call_impl is not None
    assert "_orig_mod" not in "".join(lmm.state_dict())  # checkpoints keep the plain names
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    assert grads[0].abs().sum() > 0


def test_generation_needs_a_token_to_generate():
    lmm = make()
    prompt = torch.tensor([[1, IMAGE_ID, 4]])
    inputs = lmm.build_inputs(prompt, torch.ones_like(prompt), torch.randn(1, 4, 32), IMAGE_ID)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        lmm.generate(inputs, max_new_tokens=0, eos_token_id=-1)
