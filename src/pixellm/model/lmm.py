"""The LLaVA-style large multimodal model: vision-to-language projection, LLM, LoRA (Fig. 2, F and p_V->T).

Built on ``transformers.LlavaForConditionalGeneration`` (v5 module names: ``model.language_model``,
``model.multi_modal_projector``, ``lm_head``). The vision tower inside LLaVA is dropped: the multi-scale
encoder of ``pixellm.model.vision`` replaces it, and its coarse scale feeds :meth:`LlavaLMM.embed_image`.

The image is spliced into the text by :meth:`LlavaLMM.build_inputs`: each sequence carries exactly one
image placeholder token, which is replaced by the ``P`` projected image tokens, so data pipelines need not
know ``P``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from pixellm.model.decoding import (
    CudaGraphStep,
    StaticLlamaDecoder,
    supports_cuda_graph,
    supports_static_decoding,
)


class _AddedRowsOnly(torch.autograd.Function):
    """Identity on a (V, H) vocabulary weight whose backward zeroes the gradient of the first ``base`` rows."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: Tensor, base: int) -> Tensor:
        ctx.base = base
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        grad[: ctx.base] = 0
        return grad, None


@dataclass
class LoraSettings:
    """LoRA on the language model only (official: r=8, alpha=16, dropout 0.05 on q_proj/v_proj).

    Attributes:
        r: rank of the update.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: projection names inside the language model's attention/MLP blocks.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def pattern(self) -> str:
        """Regex (``re.fullmatch`` on module names) hitting only the language model, never the vision side."""
        names = "|".join(re.escape(name) for name in self.target_modules)
        return rf".*language_model\..*\.({names})"


@dataclass
class MultimodalInputs:
    """Text and image spliced into one sequence of embeddings, ``S' = S - 1 + P``."""

    inputs_embeds: Tensor  # (B, S', H)
    attention_mask: Tensor  # (B, S')
    position_ids: Tensor  # (B, S')
    token_ids: Tensor  # (B, S') the image positions hold the image token id
    labels: Tensor | None  # (B, S') -100 on image positions, or None


class LlavaLMM(nn.Module):
    """LLaVA language side: projector p_V->T, optional image-token pooling, the LLM and its LM head.

    Args:
        pretrained: a LOCAL directory of a Hugging Face LLaVA checkpoint (``from_pretrained``); no download.
        text_config: keyword arguments of ``LlamaConfig`` for a randomly initialised model (tiny tests);
            exactly one of ``pretrained`` and ``text_config`` is given.
        vision_channels: channels of the vision features fed to the projector (with ``text_config``).
        image_pool_size: side of the image-token grid after bilinear pooling (official: 32x32 -> 16), or
            ``None`` to keep the encoder grid.
        projector_hidden_size: hidden width of the projector p_V->T, ``None`` for LLaVA's (= H); the
            released PixelLM uses 2H (Linear(C, 2H) -> GELU -> Linear(2H, H)).
        lora: LoRA settings, or ``None`` to train the whole language model.
        gradient_checkpointing: recompute LLM activations in the backward pass to save memory.
        attn_implementation: attention kernel of the LLM (``"sdpa"`` or ``"eager"``).
        compile_layers: run each decoder layer through ``torch.compile``, which fuses the elementwise work
            (RMSNorm, RoPE, SwiGLU, LoRA's dropout and scaling) that otherwise takes about half of a 7B
            training step's GPU time; measured 1.37x faster steps on an H100 (``benchmarks/gpu.py``). The
            first step pays the compilation.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        text_config: dict | None = None,
        vision_channels: int = 1024,
        image_pool_size: int | None = None,
        projector_hidden_size: int | None = None,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (text_config is None):
            raise ValueError("LlavaLMM: give exactly one of `pretrained` (a local dir) and `text_config`.")
        if pretrained is not None:
            # float32, as every other part (transformers 5 would keep the file's bf16/fp16): the run's
            # precision (Lightning) or the Predictor chooses the compute dtype
            llava = LlavaForConditionalGeneration.from_pretrained(
                pretrained, local_files_only=True, attn_implementation=attn_implementation, dtype=torch.float32
            )
        else:
            config = LlavaConfig(
                text_config=LlamaConfig(**text_config),
                vision_config=CLIPVisionConfig(
                    hidden_size=vision_channels, num_attention_heads=1, num_hidden_layers=1
                ),
                projector_hidden_act="gelu",
            )
            config._attn_implementation = attn_implementation
            llava = LlavaForConditionalGeneration(config)
        llava.model.vision_tower = None  # replaced by pixellm.model.vision
        if projector_hidden_size is not None:
            projector = llava.model.multi_modal_projector
            projector.linear_1 = nn.Linear(projector.linear_1.in_features, projector_hidden_size)
            projector.linear_2 = nn.Linear(projector_hidden_size, projector.linear_2.out_features)
        self.llava = llava
        self.image_pool_size = image_pool_size
        self.lora = lora
        self.original_vocab_size = self.embed_tokens.num_embeddings
        # transformers 5.x renamed `past_key_values` to `cache` in the model forward
        parameters = inspect.signature(self.language_model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        if gradient_checkpointing:
            self.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if compile_layers:  # in place: parameter names and checkpoints stay those of the plain model
            for layer in self.language_model.layers:
                layer.compile()

    @property
    def language_model(self) -> nn.Module:
        return self.llava.model.language_model

    @property
    def projector(self) -> nn.Module:
        return self.llava.model.multi_modal_projector

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.llava.lm_head

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    def num_image_tokens(self, grid_size: int) -> int:
        """Image tokens P spliced into the text for an encoder grid of ``grid_size``^2 patches."""
        side = self.image_pool_size or grid_size
        return side * side

    def extend_vocabulary(self, vocab_size: int) -> None:
        """Resize embeddings and LM head to the tokenizer, then apply LoRA and set what trains.

        Without LoRA the whole language model trains. With LoRA only the adapters, the projector and
        the rows of the tokens added after the base vocabulary (codebook, image token) train: the base
        rows of ``embed_tokens`` and ``lm_head`` get a zero gradient (use weight decay 0 on them).
        """
        new_rows = vocab_size - self.original_vocab_size
        if new_rows < 0:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens, fewer than the model's {self.original_vocab_size}"
            )
        if vocab_size != self.embed_tokens.num_embeddings:
            self.llava.resize_token_embeddings(vocab_size, mean_resizing=False)
        if self.lora is None:
            return
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.lora.r,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=self.lora.pattern(),
        )
        inject_adapter_in_model(config, self.llava)
        for name, param in self.llava.named_parameters():
            param.requires_grad = "lora_" in name or "multi_modal_projector" in name
        self.embed_tokens.weight.requires_grad = True
        self.lm_head.weight.requires_grad = True

    def _vocabulary_weight(self, weight: Tensor) -> Tensor:
        """``weight`` (V, H) as the forward pass should use it: under LoRA its base rows pass no gradient.

        The rows are masked inside the graph (not by a hook on the parameter), so the rule holds under every
        strategy: FSDP replaces the parameters a hook would sit on by views of its flat parameter.
        """
        if self.lora is None or not torch.is_grad_enabled():
            return weight
        return _AddedRowsOnly.apply(weight, self.original_vocab_size)

    def embed_image(self, features: Tensor) -> Tensor:
        """Project the coarse-scale vision features into the LLM's embedding space.

        Args:
            features: (B, C, h, w) patch features of scale 0.

        Returns:
            (B, P, H) image tokens.
        """
        if self.image_pool_size is not None and features.shape[-1] != self.image_pool_size:
            size = (self.image_pool_size, self.image_pool_size)
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        tokens = features.flatten(2).transpose(1, 2)  # (B, P, C)
        return self.projector(tokens)  # (B, P, H)

    def build_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_embeds: Tensor,
        image_token_id: int,
        labels: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> MultimodalInputs:
        """Replace the one image placeholder of every sequence by its P image tokens.

        Args:
            input_ids: (B, S) token ids with exactly one ``image_token_id`` per row (left or right padded).
            attention_mask: (B, S) 1 on real tokens.
            image_embeds: (B, P, H) from :meth:`embed_image`.
            image_token_id: id of the placeholder.
            labels: (B, S) next-token targets with -100 where no loss is taken, or None.
            image_mask: (B, P) bool, False on image tokens of the image's padding, which no token then
                attends to (as the release); they keep their positions. None: all attended.
        """
        is_image = input_ids == image_token_id  # (B, S)
        per_row = is_image.sum(1)
        if not torch.all(per_row == 1):
            rows = torch.nonzero(per_row != 1).flatten().tolist()
            raise ValueError(
                f"every sequence needs exactly one image token (id {image_token_id}); rows {rows} have "
                f"{per_row[rows].tolist()}"
            )
        batch, length = input_ids.shape
        num_image = image_embeds.shape[1]
        start = is_image.int().argmax(1, keepdim=True)  # (B, 1)
        pos = torch.arange(length - 1 + num_image, device=input_ids.device)[None]  # (1, S')
        in_image = (pos >= start) & (pos < start + num_image)  # (B, S')
        text_src = torch.where(pos < start, pos, pos - num_image + 1).clamp(0, length - 1)  # (B, S')
        source = torch.where(in_image, length + pos - start, text_src)  # index into [text | image]

        embedding = self._vocabulary_weight(self.embed_tokens.weight)
        text_embeds = F.embedding(input_ids, embedding, self.embed_tokens.padding_idx)  # (B, S, H)
        stacked = torch.cat([text_embeds, image_embeds.to(text_embeds.dtype)], dim=1)
        index = source[..., None].expand(-1, -1, stacked.shape[-1])
        inputs_embeds = stacked.gather(1, index)  # (B, S', H)
        real = torch.where(in_image, 1, attention_mask.gather(1, text_src))  # (B, S') 0 on text padding
        mask = real
        if image_mask is not None:
            image_src = (pos - start).clamp(0, num_image - 1)  # (B, S') index into the image tokens
            mask = torch.where(in_image, image_mask.gather(1, image_src).to(real.dtype), real)
        token_ids = torch.where(in_image, image_token_id, input_ids.gather(1, text_src))
        new_labels = None
        if labels is not None:
            new_labels = torch.where(in_image, -100, labels.gather(1, text_src))
        return MultimodalInputs(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=(real.cumsum(-1) - 1).clamp(min=0),
            token_ids=token_ids,
            labels=new_labels,
        )

    def forward(self, inputs: MultimodalInputs) -> Tensor:
        """Last-layer hidden states (B, S', H) of the LLM (no logits: see :meth:`next_token_loss`)."""
        out = self.language_model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def next_token_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the next token, with logits computed only where a label exists.

        Args:
            hidden: (B, S', H) last-layer states.
            labels: (B, S') targets, -100 where no loss is taken.
        """
        targets = labels[:, 1:]  # (B, S'-1)
        keep = targets != -100
        if not keep.any():
            return hidden.sum() * 0.0
        head = self._vocabulary_weight(self.lm_head.weight)
        logits = F.linear(hidden[:, :-1][keep], head, self.lm_head.bias)  # (M, V)
        return F.cross_entropy(logits.float(), targets[keep])

    def generate(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        eos_token_id: int,
        static_cache: bool = True,
        cuda_graph: bool = True,
        group: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Greedy decoding with a KV cache: one prefill over the prompt, then one token per step.

        A Llama LLM (LLaVA's, PixelLM's) decodes over a preallocated cache (``pixellm.model.decoding``, less
        per-step overhead than transformers' forward), and on a GPU replays its decoding step as a CUDA graph
        captured at the first step of the call; other models use transformers' ``DynamicCache``, where a
        batch without padding runs with no attention mask at all (transformers then neither grows nor inspects
        a mask at every step). The last generated token is never fed back. The loop runs under
        ``torch.inference_mode`` and calls the embedding and head weights directly; the results are returned
        as ordinary tensors.

        With ``group`` (a target's codebook tokens as training answers spell them), a row that emits
        ``group[0]`` is given the rest of the group without the LM head: the ids are fixed by the codebook's
        layout, so their logits are not computed, and a group is never broken off. When every unfinished row
        has just started a group (always, for one row) the group is fed in one step of ``len(group)`` tokens
        instead of ``len(group)`` steps of one (on a GPU that step runs eagerly, not as the graph).

        Args:
            inputs: the prompts, left-padded.
            max_new_tokens: n, the most tokens to generate.
            eos_token_id: the id that ends a row.
            static_cache: decode a Llama over the static cache; False always uses ``DynamicCache``.
            cuda_graph: replay the static cache's decoding step as a CUDA graph when the LLM's weights are on a
                GPU (``pixellm.model.decoding.supports_cuda_graph``); False runs it eagerly.
            group: (C,) ids, C >= 1: the first codebook token, then every id up to the group's last codebook
                token; None: free greedy decoding (every id from the LM head).

        Returns:
            ids: (B, n) generated ids, ``eos_token_id`` repeated after a row has finished;
            states: (B, n, H) the last-layer state that emitted each generated id (or, for an id of a
                completed group, the state at the position where the head would have emitted it).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if group is not None and (group.dim() != 1 or len(group) == 0 or eos_token_id in group.tolist()):
            raise ValueError(f"group must be a non-empty 1-d tensor of ids without the eos id, got {group.tolist()}")
        with torch.inference_mode():
            ids, states = self._greedy(inputs, max_new_tokens, eos_token_id, static_cache, cuda_graph, group)
        return ids.clone(), states.clone()

    def cached_forward(
        self,
        inputs_embeds: Tensor,
        cache: DynamicCache,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """The LLM over new embeddings (B, S, H) after those held in ``cache``, which it extends.

        Start with an empty ``DynamicCache(config=lmm.language_model.config)``; without ``position_ids`` the new
        positions follow the cached ones. Returns the last-layer states (B, S, H).
        """
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_argument: cache},
        ).last_hidden_state

    def _greedy(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        eos_token_id: int,
        static_cache: bool,
        cuda_graph: bool,
        group: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The decoding loop of :meth:`generate` (same arguments and results)."""
        state, step = self._decoding(inputs, max_new_tokens, static_cache, cuda_graph)  # (B, H) after the prompt
        position = inputs.position_ids[:, -1:]  # (B, 1)
        batch, device = state.shape[0], state.device
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        completing = group is not None  # free decoding skips the group bookkeeping (and its host syncs)
        group = group.to(device) if completing else None  # (C,)
        written = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) ids of the row's open group so far
        head, embedding = self.lm_head, self.embed_tokens.weight
        ids, states = [], []
        while True:
            forced = written > 0 if completing else None  # (B,) inside a group: the next id is group[written]
            if completing and bool((forced | finished).all()):
                token = group[written]  # no row needs the head
            else:
                token = F.linear(state, head.weight, head.bias).argmax(-1)  # (B,)
                token = torch.where(forced, group[written], token) if completing else token
            token = token.masked_fill(finished, eos_token_id)
            ids.append(token)
            states.append(state)
            finished |= token == eos_token_id
            if completing:
                written = torch.where(forced, written + 1, (token == group[0]).long()) % len(group)
            left = max_new_tokens - len(ids)  # ids still to generate
            if left == 0 or bool(finished.all()):
                break  # the last token is never fed back: n tokens take the prefill and n - 1 steps
            # every unfinished row has just started a group: feed it whole (or what the length limit leaves)
            whole = completing and len(group) > 1 and bool(((written == 1) | finished).all())
            run = min(len(group), left) if whole else 1  # tokens fed in this step
            fed, positions = token[:, None], position + 1  # (B, 1) each
            if whole:
                fed = torch.cat([fed, group[1:run].expand(batch, -1)], 1).masked_fill(finished[:, None], eos_token_id)
                positions = position + torch.arange(1, run + 1, device=device)  # (B, run)
            out = step(F.embedding(fed, embedding), positions)  # (B, run, H)
            position = positions[:, -1:]
            if whole:  # the group's ids after group[0], each from the state of the id fed before it
                for k in range(1, min(run, len(group) - 1) + 1):
                    ids.append(group[k].expand(batch).masked_fill(finished, eos_token_id))
                    states.append(out[:, k - 1])
                written.zero_()  # the group is complete, or the length limit is reached
                if len(ids) == max_new_tokens:
                    break
            state = out[:, -1]
        return torch.stack(ids, 1), torch.stack(states, 1)

    def _decoding(
        self, inputs: MultimodalInputs, max_new_tokens: int, static_cache: bool, cuda_graph: bool
    ) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
        """The prompt's last state (B, H) and ``step(embeds (B, S, H), positions (B, S)) -> (B, S, H)``, which
        feeds S tokens per call: over a static cache (``pixellm.model.decoding``) for a Llama with
        ``static_cache`` (one-token steps as a CUDA graph with ``cuda_graph`` on a GPU), else over transformers'
        ``DynamicCache``."""
        embeds, keep = inputs.inputs_embeds, inputs.attention_mask.bool()  # (B, S', H), (B, S')
        prompt = embeds.shape[1]
        if static_cache and supports_static_decoding(self.language_model):
            decoder = StaticLlamaDecoder(self.language_model, keep, prompt + max_new_tokens - 1)
            slots = torch.arange(prompt, device=embeds.device)  # (S',)
            state = decoder.forward(embeds, inputs.position_ids, slots, span=prompt)[:, -1]
            last = prompt - 1  # the cache slot of the last fed token
            graph = CudaGraphStep(decoder) if cuda_graph and supports_cuda_graph(self.language_model) else None

            def static_step(token_embeds: Tensor, positions: Tensor) -> Tensor:
                nonlocal last
                length = token_embeds.shape[1]
                slots = torch.arange(last + 1, last + 1 + length, device=token_embeds.device)  # (S,)
                last += length
                run = graph if graph is not None and length == 1 else decoder.forward
                return run(token_embeds, positions, slots)

            return state, static_step
        cache = DynamicCache(config=self.language_model.config)
        mask = None if bool(keep.all()) else inputs.attention_mask  # (B, S') or None
        state = self.cached_forward(embeds, cache, mask, inputs.position_ids)[:, -1]

        def dynamic_step(token_embeds: Tensor, positions: Tensor) -> Tensor:
            nonlocal mask
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], token_embeds.shape[1])], dim=1)
            return self.cached_forward(token_embeds, cache, mask, positions)

        return state, dynamic_step
