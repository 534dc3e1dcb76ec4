"""Greedy decoding of a Llama-architecture LLM over a preallocated KV cache (``LlavaLMM.generate``).

A cached decoding step of transformers' eager Llama is bound by per-call work on the host, not by
arithmetic: 1.5-3 ms for a 2-layer toy on CPU, and about 0.9 ms per decoder layer on an H100 (29.7 ms per
step for LLaVA-7B's LLM, where reading its weights takes about 4 ms; README, Performance).
`StaticLlamaDecoder` runs the same layers with less of it:

- The keys and values of every layer live in buffers of ``max_length`` slots, written in place
  (``index_copy_``); a decoding step attends to all slots (the prefill: to the prompt's), with a mask of
  the valid ones. Every step has the same shapes, so on a GPU a step is captured once as a CUDA graph
  and replayed for every later token (`CudaGraphStep`): one launch instead of some 30 per layer
  (LLaVA-7B's LLM in bf16 on an H100: 8.1 ms per token against 25.4 ms eager; benchmarks/gpu_decoding.py).
- The step calls the decoder layers' own modules (norms, projections, MLP, rotary embedding), so LoRA
  (peft) layers, biases and rotary scaling work as in transformers; only the attention block is
  spelled out here (transformers' rotation, cache write, scaled dot-product attention with grouped heads).
- Models with FSDP units inside decode with transformers' ``DynamicCache`` (``supports_static_decoding``).
- Padding (left-padded batches): a padding slot is never attended to by other positions; each position
  always attends to itself, so no attention row is empty (an empty row can give NaN on some kernels,
  which the next layer would write into the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def supports_static_decoding(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers language model without head) is a Llama the static decoder runs.

    Not when FSDP shards any of its modules: FSDP gathers a unit's parameters in that unit's forward, which
    the static decoder bypasses by calling the layers' submodules (DeepSpeed ZeRO-3 hooks every module, and
    FSDP wrapping the whole task gathers everything in the task's forward: both are fine).
    """
    is_llama = getattr(getattr(model, "config", None), "model_type", None) == "llama" and hasattr(model, "rotary_emb")
    return is_llama and not _has_fsdp_units(model)


def supports_cuda_graph(model: nn.Module) -> bool:
    """Whether a step of ``model``'s static decoding can be replayed as a CUDA graph: its weights are on a GPU
    and stay where they are between steps (not DeepSpeed ZeRO-3 partitions, which its hooks gather and free
    at every call, outside anything a graph records)."""
    parameters = list(model.parameters())
    return all(p.is_cuda for p in parameters) and not any(hasattr(p, "ds_id") for p in parameters)


def _has_fsdp_units(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in model.modules())


class StaticLlamaDecoder:
    """A Llama language model's forward over a fixed-size KV cache, for one batch of generation.

    Args:
        model: the transformers ``LlamaModel`` (``supports_static_decoding``), in eval mode.
        keep: (B, T) bool, the valid (non-padding) slots of the prompt, left-padded; T <= ``max_length``.
        max_length: slots in the cache: the prompt length plus the tokens still to be fed.
    """

    def __init__(self, model: nn.Module, keep: Tensor, max_length: int) -> None:
        if not supports_static_decoding(model):
            raise ValueError(f"StaticLlamaDecoder runs Llama models, not {type(model).__name__}")
        config = model.config
        self.model = model
        self.layers = list(model.layers[: config.num_hidden_layers])
        batch, prompt = keep.shape
        self.cache_shape = (batch, config.num_key_value_heads, max_length, self.layers[0].self_attn.head_dim)
        # L x (B, KV heads, T_max, d), made at the first write in the keys' dtype (under autocast that is not
        # the weights' dtype)
        self.keys: list[Tensor | None] = [None] * len(self.layers)
        self.values: list[Tensor | None] = [None] * len(self.layers)
        self.valid = torch.ones(batch, max_length, dtype=torch.bool, device=keep.device)  # (B, T_max)
        self.valid[:, :prompt] = keep.bool()
        self.slot_index = torch.arange(max_length, device=keep.device)  # (T_max,)
        self.grouped = config.num_key_value_heads != config.num_attention_heads

    def forward(self, embeds: Tensor, positions: Tensor, slots: Tensor, span: int | None = None) -> Tensor:
        """Runs the model on new embeddings written into cache ``slots``; returns the last-layer states.

        Args:
            embeds: (B, S, H) input embeddings.
            positions: (B, S) rotary positions.
            slots: (S,) long, the cache slots of the S new positions (the same for every row).
            span: attend to the first ``span`` slots only (the prompt's, in the prefill: the later ones are
                empty); None: all of them, so that every decoding step has the same shapes.

        Returns:
            (B, S, H) after the final norm.
        """
        batch, length, _ = embeds.shape
        cos, sin = self.model.rotary_emb(embeds, positions)  # (B, S, d) each
        index, valid = self.slot_index[:span], self.valid[:, :span]  # (T,), (B, T): the attended slots
        earlier = index[None, :] <= slots[:, None]  # (S, T) causal
        mask = ((valid[:, None, :] & earlier[None]) | (index[None, :] == slots[:, None])[None])[:, None]  # (B, 1, S, T)
        hidden = embeds
        for number, layer in enumerate(self.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            heads = (batch, length, -1, attention.head_dim)
            query = attention.q_proj(normed).view(heads).transpose(1, 2)  # (B, heads, S, d)
            key = attention.k_proj(normed).view(heads).transpose(1, 2)  # (B, KV heads, S, d)
            value = attention.v_proj(normed).view(heads).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if self.keys[number] is None:
                self.keys[number], self.values[number] = key.new_zeros(self.cache_shape), value.new_zeros(self.cache_shape)
            keys, values = self.keys[number], self.values[number]
            keys.index_copy_(2, slots, key)
            values.index_copy_(2, slots, value)
            out = F.scaled_dot_product_attention(
                query, keys[:, :, :span], values[:, :, :span], attn_mask=mask, scale=attention.scaling,
                enable_gqa=self.grouped,
            )  # (B, heads, S, d)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.norm(hidden)


class CudaGraphStep:
    """One decoding step of a `StaticLlamaDecoder` (one new token per row), captured as a CUDA graph.

    The first call runs the step eagerly (on a side stream: the warm-up a capture needs) and captures it; every
    later call copies its inputs into the captured ones and replays the graph. Under autocast the step is
    captured with autocast's weight cache off, so the graph casts the weights itself rather than reading
    casts that autocast frees when its region ends.

    Args:
        decoder: the decoder, its prompt already run (the caches exist: the graph writes into them).
    """

    def __init__(self, decoder: StaticLlamaDecoder) -> None:
        if any(keys is None for keys in decoder.keys):
            raise ValueError("CudaGraphStep needs a decoder whose prompt has run (its caches are allocated)")
        self.decoder = decoder
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()  # the captured step's embeds, positions, slots
        self.output: Tensor | None = None  # (B, 1, H) the captured step's result, rewritten at every replay

    def __call__(self, embeds: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """``decoder.forward(embeds (B, 1, H), positions (B, 1), slots (1,))``, as a new (B, 1, H) tensor."""
        if self.graph is None:
            return self._capture(embeds, positions, slots)
        for captured, given in zip(self.inputs, (embeds, positions, slots), strict=True):
            captured.copy_(given)
        self.graph.replay()
        return self.output.clone()

    def _capture(self, embeds: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        device = embeds.device
        self.inputs = (embeds.clone(), positions.clone(), slots.clone())
        autocast = torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False
        )
        main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side), autocast:
            first = self.decoder.forward(*self.inputs)  # (B, 1, H) the step itself, which is also the warm-up
        main.wait_stream(side)
        first.record_stream(main)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls during the capture (a DataLoader's pin-memory thread, NCCL's
        # watchdog) go on normally; the default mode, global, would fail the capture and their calls
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), autocast:  # records, does not run
            self.output = self.decoder.forward(*self.inputs)
        return first
