"""Static-cache decoding (pixellm.model.decoding) against transformers' own forward and DynamicCache decoding."""

import sys
import threading

import pytest
import torch

from pixellm.model.decoding import (
    CudaGraphStep,
    StaticLlamaDecoder,
    supports_cuda_graph,
    supports_static_decoding,
)
from pixellm.model.lmm import LlavaLMM, LoraSettings

IMAGE_ID = 39
GROUPED = dict(  # grouped-query attention: 4 query heads share 2 key/value heads
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)


def make(**kwargs) -> LlavaLMM:
    torch.manual_seed(0)
    return LlavaLMM(text_config=GROUPED, vision_channels=8, **kwargs).eval()


def padded_inputs(lmm: LlavaLMM, device: str = "cpu"):
    batch = torch.tensor([[0, 0, 1, IMAGE_ID, 4, 9], [1, 5, 6, IMAGE_ID, 3, 8]])  # row 0 left padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    image = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    return lmm.build_inputs(batch.to(device), mask.to(device), image.to(device), IMAGE_ID)


def test_prompt_states_equal_the_transformers_forward_on_valid_positions():
    lmm = make()
    inputs = padded_inputs(lmm)
    with torch.no_grad():
        expected = lmm(inputs)  # (B, S', H) transformers' forward with the padding mask
        decoder = StaticLlamaDecoder(lmm.language_model, inputs.attention_mask.bool(), max_length=12)
        states = decoder.forward(inputs.inputs_embeds, inputs.position_ids, torch.arange(9))  # all 12 slots
        prefill = decoder.forward(inputs.inputs_embeds, inputs.position_ids, torch.arange(9), span=9)
    valid = inputs.attention_mask.bool()
    assert states.shape == (2, 9, 32)
    assert torch.isfinite(states).all()  # padding positions too (each attends at least to itself)
    torch.testing.assert_close(states[valid], expected[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill, states, rtol=1e-6, atol=1e-6)  # the empty slots change nothing


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, dropout=0.0)])
def test_static_decoding_equals_dynamic_cache_decoding(monkeypatch: pytest.MonkeyPatch, lora):
    lmm = make(lora=lora)
    lmm.extend_vocabulary(GROUPED["vocab_size"] + 2)  # adds the adapters (LoRA runs) and two rows
    lora_b = [parameter for name, parameter in lmm.named_parameters() if "lora_B" in name]
    assert len(lora_b) == (0 if lora is None else 4)  # q_proj and v_proj of 2 layers
    for parameter in lora_b:  # a non-zero update (B starts at 0), so that the adapters matter
        torch.nn.init.normal_(parameter, std=0.5)
    inputs = padded_inputs(lmm)
    lengths, forward = [], StaticLlamaDecoder.forward  # the static decoder's calls, by sequence length
    monkeypatch.setattr(StaticLlamaDecoder, "forward", lambda self, embeds, *rest, **options: lengths.append(embeds.shape[1])
                        or forward(self, embeds, *rest, **options))
    ids, states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1)
    assert lengths == [9] + [1] * 6  # the prompt, then 6 fed tokens
    dynamic_ids, dynamic_states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, static_cache=False)
    assert len(lengths) == 7  # the DynamicCache path does not use it
    assert ids.shape == (2, 7)
    assert torch.equal(ids, dynamic_ids)
    torch.testing.assert_close(states, dynamic_states, rtol=1e-5, atol=1e-5)


def test_only_llama_models_are_decoded_statically():
    lmm = make()
    assert supports_static_decoding(lmm.language_model)
    not_llama = torch.nn.Linear(2, 2)
    assert not supports_static_decoding(not_llama)
    with pytest.raises(ValueError, match="Llama"):
        StaticLlamaDecoder(not_llama, torch.ones(1, 3, dtype=torch.bool), max_length=4)


def test_fsdp_sharded_layers_decode_with_the_dynamic_cache(tmp_path):
    """FSDP gathers a unit's parameters only in the unit's own forward, which the static decoder bypasses."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    lmm = make()
    inputs = padded_inputs(lmm)
    expected, _ = lmm.generate(inputs, max_new_tokens=5, eos_token_id=-1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layers = lmm.language_model.layers
        layers[0] = FullyShardedDataParallel(layers[0], use_orig_params=True, device_id=torch.device("cpu"))
        assert not supports_static_decoding(lmm.language_model)
        ids, _ = lmm.generate(inputs, max_new_tokens=5, eos_token_id=-1)
    finally:
        dist.destroy_process_group()
    assert torch.equal(ids, expected)


def test_static_decoding_under_autocast_keeps_the_keys_dtype():
    """bf16-mixed precision runs validation under autocast: projections give bf16, the weights stay fp32."""
    lmm = make()
    inputs = padded_inputs(lmm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1)
        dynamic_ids, dynamic_states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, static_cache=False)
    assert ids.shape == (2, 7) and torch.isfinite(states).all()
    assert torch.equal(ids, dynamic_ids)
    torch.testing.assert_close(states, dynamic_states, rtol=1e-5, atol=1e-5)


def test_a_cuda_graph_step_needs_the_prompt_run_first():
    lmm = make()
    inputs = padded_inputs(lmm)
    decoder = StaticLlamaDecoder(lmm.language_model, inputs.attention_mask.bool(), max_length=12)
    with pytest.raises(ValueError, match="prompt has run"):
        CudaGraphStep(decoder)
    assert not supports_cuda_graph(lmm.language_model)  # CPU weights: generate runs the step eagerly


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_decoding_equals_eager_static_decoding(monkeypatch: pytest.MonkeyPatch, autocast: bool):
    """The graph is captured once (two Python calls of the step: the eager first step and the capture) and
    replayed for the other five fed tokens, with the eager step's ids and states."""
    lmm = make(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    lmm.extend_vocabulary(GROUPED["vocab_size"] + 2)
    for name, parameter in lmm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    lmm = lmm.cuda()
    assert supports_cuda_graph(lmm.language_model)
    inputs = padded_inputs(lmm, "cuda")
    lengths, forward = [], StaticLlamaDecoder.forward
    monkeypatch.setattr(StaticLlamaDecoder, "forward", lambda self, embeds, *rest, **options: lengths.append(embeds.shape[1])
                        or forward(self, embeds, *rest, **options))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ids, states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1)
        assert lengths == [9, 1, 1]  # prompt, first step, capture: the other 5 steps are replays
        eager_ids, eager_states = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, cuda_graph=False)
    assert lengths[3:] == [9] + [1] * 6
    assert ids.shape == (2, 7) and torch.isfinite(states).all()
    assert torch.equal(ids, eager_ids)
    tolerance = 1e-2 if autocast else 1e-5  # the same kernels, but the graph's may run another cuBLAS algorithm
    torch.testing.assert_close(states, eager_states, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_lets_other_threads_use_cuda():
    """A DataLoader's pin-memory thread allocates page-locked memory (querying the events of earlier copies)
    while validation generates: that must neither fail the capture nor the thread."""
    lmm = make().cuda()
    inputs = padded_inputs(lmm, "cuda")
    expected, _ = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, cuda_graph=False)
    stop, errors, copies = threading.Event(), [], [0]

    def pin_and_copy() -> None:
        try:
            while not stop.is_set():
                torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True).to("cuda", non_blocking=True)
                copies[0] += 1
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that the copies interleave with the captures
    thread = threading.Thread(target=pin_and_copy)
    thread.start()
    try:
        decoded = [lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1)[0] for _ in range(20)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert errors == [] and copies[0] > 0
    assert all(torch.equal(ids, expected) for ids in decoded)
