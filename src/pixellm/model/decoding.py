"""Greedy decoding of a Llama-architecture LLM over a preallocated KV cache (``LlavaLMM.generate``).

At batch 1 a decoding step of transformers' eager Llama is bound by the host, not the device: about 0.9 ms
of Python and kernel launches per decoder layer (README, Performance: 29.7 ms per step for LLaVA-7B's LLM on
an H100, where reading its weights takes about 4 ms). `StaticLlamaDecoder` runs the same layers with less
per-step work, and its steps have fixed shapes, so that on a GPU one step is captured once as a CUDA graph
and replayed for every token.

- The keys and values of every layer live in buffers of ``max_length`` slots, written in place
  (``index_copy_``); attention always spans all slots, with a mask of the valid ones.
- The step calls the decoder layers' own modules (norms, projections, MLP, rotary embedding), so LoRA
  (peft) layers, biases and rotary scaling work as in transformers; only the attention block is
  spelled out here (rotation, cache write, scaled dot-product attention with grouped heads).
- Padding (left-padded batches): a padding slot is never attended to by other positions; each position
  always attends to itself, so no attention row is empty (an empty row would give NaN, which the
  next layer would write into the cache).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supports_static_decoding(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers language model without head) is a Llama the static decoder runs."""
    return getattr(getattr(model, "config", None), "model_type", None) == "llama" and hasattr(model, "rotary_emb")


def _rotate_half(x: Tensor) -> Tensor:
    """(..., d) -> (..., d): the halves [x1, x2] as [-x2, x1] (RoPE's rotation, Llama's layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


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
        attention = self.layers[0].self_attn
        parameter = next(model.parameters())
        shape = (batch, config.num_key_value_heads, max_length, attention.head_dim)
        self.keys = [parameter.new_zeros(shape) for _ in self.layers]  # L x (B, KV heads, T_max, d)
        self.values = [parameter.new_zeros(shape) for _ in self.layers]
        self.valid = torch.ones(batch, max_length, dtype=torch.bool, device=keep.device)  # (B, T_max)
        self.valid[:, :prompt] = keep.bool()
        self.slot_index = torch.arange(max_length, device=keep.device)  # (T_max,)
        self.grouped = config.num_key_value_heads != config.num_attention_heads

    def forward(self, embeds: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """Runs the model on new embeddings written into cache ``slots``; returns the last-layer states.

        Args:
            embeds: (B, S, H) input embeddings.
            positions: (B, S) rotary positions.
            slots: (S,) long, the cache slots of the S new positions (the same for every row).

        Returns:
            (B, S, H) after the final norm.
        """
        batch, length, _ = embeds.shape
        cos, sin = self.model.rotary_emb(embeds, positions)  # (B, S, d) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, d)
        earlier = self.slot_index[None, :] <= slots[:, None]  # (S, T_max) causal
        mask = (self.valid[:, None, :] & earlier[None]) | (self.slot_index[None, :] == slots[:, None])[None]
        mask = mask[:, None]  # (B, 1, S, T_max)
        hidden = embeds
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            heads = (batch, length, -1, attention.head_dim)
            query = attention.q_proj(normed).view(heads).transpose(1, 2)  # (B, heads, S, d)
            key = attention.k_proj(normed).view(heads).transpose(1, 2)  # (B, KV heads, S, d)
            value = attention.v_proj(normed).view(heads).transpose(1, 2)
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
            keys.index_copy_(2, slots, key)
            values.index_copy_(2, slots, value)
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=self.grouped
            )  # (B, heads, S, d)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.norm(hidden)

    def step_function(
        self, embeds: Tensor, positions: Tensor, slot: Tensor, graph: bool
    ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """A one-token step ``step(embeds (B, 1, H), positions (B, 1), slot (1,)) -> (B, 1, H)``.

        With ``graph`` (CUDA only), the step is captured once as a CUDA graph on the example inputs given
        here and replayed on copies of the new inputs; the example step's cache write is to ``slot``, which
        the first real step overwrites. Without, the step is :meth:`forward`.
        """
        if not graph:
            return self.forward
        inputs = (embeds.clone(), positions.clone(), slot.clone())
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(*inputs)  # warm-up outside the capture (allocator, library handles)
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                output = self.forward(*inputs)
        except RuntimeError as error:  # a module that cannot be captured: decode without the graph
            warnings.warn(f"decoding without a CUDA graph: capturing the step failed ({error})", stacklevel=2)
            return self.forward

        def replay(new_embeds: Tensor, new_positions: Tensor, new_slot: Tensor) -> Tensor:
            for static, new in zip(inputs, (new_embeds, new_positions, new_slot), strict=True):
                static.copy_(new)
            cuda_graph.replay()
            return output

        return replay
