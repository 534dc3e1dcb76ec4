"""FLOPs of one sample: PixelLM-7B/13B vs a LISA-shaped model, counted on the meta device (Table 1).

Every model is built at full size from code (no download, no weights, no memory: ``torch.device("meta")``)
through the project's own classes, and one sample is pushed through it under
``torch.utils.flop_counter.FlopCounterMode``, one part at a time:

- PixelLM (Sec. 3.1, 5.1; REFERENCE.md): CLIP ViT-L/14 at 448 px (32x32 patches, layers -2 and -11), p_V->T on
  16x16 = 256 pooled image tokens, the LLaVA-7B / Llama-2-13B LLM, the codebook (L=2, N=3, learned fusion),
  p_V->D on both scales (at inference its Linear(2H, H) and Conv1x1 as one product, formed by the first
  sample of an evaluation and kept: printed apart, not per sample) and the cascaded pixel decoder (release sizes).
- LISA: the same LLM, CLIP ViT-L/14 at 224 px (16x16 = 256 image tokens), the SAM ViT-H/16 image encoder at
  1024 px (timm ``samvit_huge_patch16``), LISA's text_hidden_fcs on the [SEG] state, and a SAM mask decoder
  (our ``TwoWayTransformer`` at 64x64 + SAM's 4x output upscaling, 4 hypernetworks, IoU head).

One sample = greedy generation with the KV cache, as ``LlavaLMM.generate`` runs it: a prefill over the prompt
(text + P image tokens), then one cached step per answer token but the last (never fed back), LM-head logits
at the A positions that emit the answer, masks for ``--targets`` targets. (Counted through transformers'
``DynamicCache``; the decoding steps of ``generate``'s static cache also span the slots not yet written, masked
out: 0.24 GFLOPs more at 7B, under 0.01 %.) FlopCounterMode counts matmuls/convolutions/attention as 2 FLOPs per multiply-add; MACs = FLOPs / 2.
Bilinear resizes, norms and activations are not counted (they are < 0.1 % here).

Run: python benchmarks/flops.py [--prompt-tokens 64 --answer-tokens 32 --targets 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from pixellm.model.codebook import SegmentationCodebook
from pixellm.model.decoder import CascadedPixelDecoder, FourierPositionalEncoding
from pixellm.model.lmm import LlavaLMM
from pixellm.model.projection import VisionDecoderProjection
from pixellm.model.transformer import MLP, LayerNorm2d, TwoWayTransformer
from pixellm.model.vision import CLIPVisionEncoder

# LLaVA-7B (Vicuna-7B = Llama-7B shape) and llava-llama-2-13b (Llama-2-13B shape); vocab + 7 added tokens
LLMS = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
VOCAB = 32000 + 7
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=336)
PAPER_TFLOPS = {("PixelLM", "7B"): 3.57, ("LISA", "7B"): 7.16, ("PixelLM", "13B"): 6.65, ("LISA", "13B"): 10.24}
SAM_DIM = 256
CLIP_MAPS = [torch.zeros(1, 1024, 32, 32, device="meta")] * 2  # PixelLM's L = 2 CLIP maps of one 448 px image


def meta(*shape: int) -> Tensor:
    return torch.zeros(*shape, device="meta")


def count(fn: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """FLOPs of ``fn()`` and its result."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def build_llm(size: str, vision_channels: int, image_pool_size: int | None) -> LlavaLMM:
    config = dict(LLMS[size], vocab_size=32000, num_key_value_heads=LLMS[size]["num_attention_heads"],
                  max_position_embeddings=4096)
    lmm = LlavaLMM(text_config=config, vision_channels=vision_channels, image_pool_size=image_pool_size)
    lmm.extend_vocabulary(VOCAB)
    return lmm


def decoding_schedule(answer_tokens: int, groups: int, group_size: int) -> tuple[list[int], list[int]]:
    """How ``LlavaLMM.generate`` feeds one row's answer of A ids holding ``groups`` codebook groups of
    ``group_size`` ids that it completes (``group=``): the tokens fed per step after the prefill, and the answer
    positions whose id comes from the LM head. Laid out as text, a group, text, ..., a group, text (the eos).
    ``groups=0`` is free greedy decoding: one token per step, the head at every position."""
    text = answer_tokens - groups * group_size
    per = text // (groups + 1)
    starts = []  # (A,) whether the id there opens a group
    for _ in range(groups):
        starts += [False] * per + [True] + [False] * (group_size - 1)
    starts += [False] * (answer_tokens - len(starts))
    runs, head, k = [], [0], 0  # the first id comes from the prefill's last state
    while k < answer_tokens - 1:
        if starts[k] and group_size > 1:  # fed whole: C - 1 ids without the head, then a free one
            run = min(group_size, answer_tokens - 1 - k)
            runs.append(run)
            k += min(run, group_size - 1)
            if run == group_size:
                k += 1
                head.append(k)
        else:
            runs.append(1)
            k += 1
            head.append(k)
    return runs, head


def llm_flops(
    lmm: LlavaLMM,
    image_embeds: Tensor,
    text_tokens: int,
    answer_tokens: int,
    *,
    generation: bool = True,
    groups: int = 0,
    group_size: int = 1,
) -> tuple[int, Tensor]:
    """The LLM over [text | image | answer] embeddings and the LM head at the positions whose ids it gives.

    ``generation=True`` counts greedy decoding as ``LlavaLMM.generate`` runs it: a prefill over the prompt, then
    cached steps over the answer's tokens but the last, which is never fed back (``decoding_schedule``: with
    ``groups`` completed groups, each is fed in one step and the head skips its ids after the first).
    ``generation=False`` counts one forward over the whole sequence (teacher forcing, as in training, the head
    at all A positions), run with ``use_cache=True`` and no padding mask: the training forward's
    ``use_cache=False`` path runs transformers' packed-sequence check, which reads tensor values and cannot run
    on meta. The matmuls are the same.

    Returns:
        The FLOPs and (1, A, H) the last-layer states that emit the answer tokens.
    """
    prompt = text_tokens + image_embeds.shape[1]
    width = lmm.hidden_size

    def forward() -> Tensor:
        hidden = lmm.language_model(inputs_embeds=meta(1, prompt + answer_tokens, width), use_cache=True)
        states = hidden.last_hidden_state[:, prompt - 1 : -1]  # (1, A, H)
        lmm.lm_head(states)  # (1, A, V)
        return states

    def generate() -> Tensor:
        runs, head = decoding_schedule(answer_tokens, groups, group_size)
        cache = DynamicCache(config=lmm.language_model.config)
        states = [lmm.cached_forward(meta(1, prompt, width), cache)[:, -1:]]  # (1, 1, H), then (1, run, H) each
        states += [lmm.cached_forward(meta(1, run, width), cache) for run in runs]
        states = torch.cat(states, dim=1)  # (1, A, H)
        lmm.lm_head(states[:, head])  # (1, A', V)
        return states

    return count(generate if generation else forward)


def pixellm_parts(
    vision: CLIPVisionEncoder,
    lmm: LlavaLMM,
    codebook: SegmentationCodebook,
    projection: VisionDecoderProjection,
    decoder: CascadedPixelDecoder,
    text_tokens: int,
    answer_tokens: int,
    targets: int,
    *,
    generation: bool = True,
    complete_groups: bool = True,
) -> dict[str, int]:
    """Per-part forward FLOPs of one sample through PixelLM parts built on the meta device (``generation``:
    as in ``llm_flops``; ``complete_groups``: generation completes every codebook group, as ``PixelLMTask``
    does by default, else free greedy decoding)."""
    size = vision.image_size
    parts = {}
    parts["vision encoder"], features = count(lambda: vision(meta(1, 3, size, size)))  # L x (1, C, h, w)
    image_flops, image_embeds = count(lambda: lmm.embed_image(features[0]))  # (1, P, H)
    groups = (targets, codebook.group_size) if complete_groups else (0, 1)
    llm, states = llm_flops(lmm, image_embeds, text_tokens, answer_tokens, generation=generation,
                            groups=groups[0], group_size=groups[1])
    parts["LLM (+ p_V->T, LM head)"] = image_flops + llm
    group = (codebook.num_scales, codebook.tokens_per_scale)
    code_states = states[0, : targets * codebook.group_size].reshape(targets, *group, -1)  # (K, L, N, H)
    parts["codebook + fusion"], queries = count(lambda: codebook(code_states))  # (K, L, D)
    parts["p_V->D projection"], maps = count(lambda: projection(features))  # L x (1, D, h, w)
    batch_index = torch.zeros(targets, dtype=torch.long, device="meta")
    parts["pixel decoder"], _ = count(lambda: decoder(maps, queries, batch_index))  # (K, 2^L h, 2^L w)
    return parts


def pixellm(size: str, text_tokens: int, answer_tokens: int, targets: int, complete_groups: bool = True) -> dict[str, int]:
    """Per-part FLOPs of one PixelLM-7B/13B sample (``complete_groups``: as in ``pixellm_parts``)."""
    with torch.device("meta"):
        vision = CLIPVisionEncoder(config=CLIP_L14, image_size=448, feature_layers=[-2, -11])
        lmm = build_llm(size, vision_channels=1024, image_pool_size=16)
        hidden = lmm.hidden_size
        codebook = SegmentationCodebook(hidden_size=hidden, decoder_dim=SAM_DIM, num_scales=2, tokens_per_scale=3)
        projection = build_projection(hidden)
        decoder = CascadedPixelDecoder(num_scales=2, dim=SAM_DIM)
    projection(CLIP_MAPS)  # an earlier sample of the evaluation formed its product (product_flops)
    return pixellm_parts(vision, lmm, codebook, projection, decoder, text_tokens, answer_tokens, targets,
                         complete_groups=complete_groups)


def build_projection(hidden: int) -> VisionDecoderProjection:
    """PixelLM's p_V->D at LLM width H, in eval mode (inference, as Table 1)."""
    return VisionDecoderProjection(in_channels=1024, out_channels=SAM_DIM, mlp_dim=2 * hidden, embed_dim=hidden).eval()


def product_flops(size: str) -> int:
    """FLOPs of forming p_V->D's (D, M) product, which the first sample of an evaluation does for all the others."""
    with torch.device("meta"):
        projection = build_projection(LLMS[size]["hidden_size"])
    first, _ = count(lambda: projection(CLIP_MAPS))
    later, _ = count(lambda: projection(CLIP_MAPS))
    return first - later


class SamMaskDecoder(nn.Module):
    """SAM's mask decoder, for counting: two-way transformer at 64x64, 4x upscaling, 4 hypernetworks, IoU head."""

    def __init__(self, dim: int = SAM_DIM, mask_tokens: int = 4) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth=2, dim=dim, num_heads=8, mlp_dim=2048, attention_downsample=2)
        self.positional_encoding = FourierPositionalEncoding(dim=dim)
        self.tokens = nn.Parameter(torch.zeros(1 + mask_tokens, dim))  # IoU token + mask tokens
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(num_channels=dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU(),
        )
        self.hypernetworks = nn.ModuleList(
            MLP(in_dim=dim, hidden_dim=dim, out_dim=dim // 8, num_layers=3) for _ in range(mask_tokens)
        )
        self.iou_head = MLP(in_dim=dim, hidden_dim=256, out_dim=mask_tokens, num_layers=3)

    def forward(self, image: Tensor, prompts: Tensor) -> Tensor:
        """image (1, D, 64, 64) embeddings, prompts (K, D) -> (K, 4, 256, 256) mask logits."""
        k, (h, w) = prompts.shape[0], image.shape[-2:]
        tokens = torch.cat([self.tokens.expand(k, -1, -1), prompts[:, None]], dim=1)  # (K, 6, D)
        pe = self.positional_encoding(h, w)  # (D, h, w)
        tokens, image = self.transformer(image.expand(k, -1, -1, -1), pe, tokens)
        pixels = self.output_upscaling(image)  # (K, D/8, 4h, 4w)
        hyper = torch.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(self.hypernetworks)], 1)  # (K, 4, D/8)
        self.iou_head(tokens[:, 0])
        return torch.einsum("kmc,kchw->kmhw", hyper, pixels)


def lisa(size: str, text_tokens: int, answer_tokens: int, targets: int) -> dict[str, int]:
    """Per-part FLOPs of one LISA sample (one [SEG] token and one SAM decoder pass per target)."""
    with torch.device("meta"):
        clip = CLIPVisionEncoder(config=dict(CLIP_L14, image_size=224), image_size=224, feature_layers=[-2])
        sam = timm.create_model("samvit_huge_patch16", pretrained=False, img_size=1024, num_classes=0)
        lmm = build_llm(size, vision_channels=1024, image_pool_size=None)
        text_fcs = SegmentationCodebook(hidden_size=lmm.hidden_size, decoder_dim=SAM_DIM, num_scales=1,
                                        tokens_per_scale=1, fusion="mean")
        mask_decoder = SamMaskDecoder()
    parts = {}
    parts["vision encoder"], features = count(lambda: clip(meta(1, 3, 224, 224)))  # (1, 1024, 16, 16)
    image_flops, image_embeds = count(lambda: lmm.embed_image(features[0]))  # (1, 256, H)
    llm, states = llm_flops(lmm, image_embeds, text_tokens, answer_tokens)
    parts["LLM (+ p_V->T, LM head)"] = image_flops + llm
    seg_states = states[0, :targets].reshape(targets, 1, 1, lmm.hidden_size)  # (K, 1, 1, H)
    parts["codebook + fusion"], prompts = count(lambda: text_fcs(seg_states)[:, 0])  # (K, D)
    parts["SAM ViT-H image encoder"], image = count(lambda: sam.forward_features(meta(1, 3, 1024, 1024)))
    parts["pixel decoder"], _ = count(lambda: mask_decoder(image, prompts))  # (K, 4, 256, 256)
    return parts


def llm_polynomial(size: str, answer_tokens: int) -> Tensor:
    """Coefficients (c0, c1, c2) of the LLM's FLOPs as a function of the sequence length S' (exactly quadratic:
    linear layers grow with S', attention with S'^2, the LM head on the answer is constant)."""
    with torch.device("meta"):
        lmm = build_llm(size, vision_channels=1024, image_pool_size=16)
    lengths = torch.tensor([320.0, 480.0, 640.0], dtype=torch.float64)
    flops = [llm_flops(lmm, meta(1, 256, lmm.hidden_size), int(s) - 256 - answer_tokens, answer_tokens)[0]
             for s in lengths]
    vandermonde = torch.stack([lengths**0, lengths, lengths**2], dim=1)
    return torch.linalg.solve(vandermonde, torch.tensor(flops, dtype=torch.float64))


def paper_convention(totals: dict, llm: dict, answer_tokens: int) -> None:
    """Which (unit, sequence length) makes our LLM count explain Table 1.

    PixelLM-13B and -7B share everything but the LLM, so the paper's 13B - 7B difference (3.08) fixes the
    sequence length S' for each unit; the rest of each paper figure is then its non-LLM part, compared with ours.
    """
    poly = {size: llm_polynomial(size, answer_tokens) for size in LLMS}
    print("\nconvention: S' solving paper(PixelLM-13B) - paper(PixelLM-7B) = 3.08 with our LLM count, and the "
          "non-LLM part each paper figure then implies (TFLOPs or TMACs)")
    print(f"{'unit':<8}{'S_prime':>8}{'PixelLM-7B paper':>18}{'ours':>7}{'LISA-7B paper':>15}{'ours':>7}")
    gap = PAPER_TFLOPS["PixelLM", "13B"] - PAPER_TFLOPS["PixelLM", "7B"]
    for unit, scale in (("TFLOPs", 1.0), ("TMACs", 0.5)):
        c0, c1, c2 = ((poly["13B"] - poly["7B"]) * scale / 1e12).tolist()
        length = (-c1 + (c1 * c1 - 4 * c2 * (c0 - gap)) ** 0.5) / (2 * c2)
        llm7 = float(poly["7B"] @ torch.tensor([1.0, length, length**2], dtype=torch.float64)) * scale / 1e12
        row = f"{unit:<8}{length:>8.0f}"
        for name in ("PixelLM", "LISA"):
            ours = (totals[name, "7B"] - llm[name, "7B"]) * scale / 1e12
            row += f"{PAPER_TFLOPS[name, '7B'] - llm7:>{18 if name == 'PixelLM' else 15}.2f}{ours:>7.2f}"
        print(row)


@torch.no_grad()  # inference, as Table 1: p_V->D takes its product form, kept across samples (pixellm.model.projection)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the prompt, image excluded")
    parser.add_argument("--answer-tokens", type=int, default=32, help="answer tokens, codebook tokens included")
    parser.add_argument("--targets", type=int, default=3, help="masks decoded (PixelLM needs 6 answer tokens each)")
    args = parser.parse_args()
    if args.answer_tokens < 6 * args.targets:
        parser.error("--answer-tokens must hold the 6 codebook tokens of every target")
    print(f"one sample: {args.prompt_tokens} prompt text tokens + 256 image tokens + {args.answer_tokens} answer "
          f"tokens, {args.targets} masks; FlopCounterMode on the meta device (TFLOPs = 2 x TMACs)")
    totals, llm = {}, {}
    for size in LLMS:
        for name, fn in (("PixelLM", pixellm), ("LISA", lisa)):
            parts = fn(size, args.prompt_tokens, args.answer_tokens, args.targets)
            total = sum(parts.values())
            totals[name, size] = total
            llm[name, size] = parts["LLM (+ p_V->T, LM head)"]
            print(f"\n{name}-{size}: {total / 1e12:.2f} TFLOPs = {total / 2e12:.2f} TMACs "
                  f"(paper Table 1: {PAPER_TFLOPS[name, size]})")
            for part, flops in parts.items():
                print(f"  {part:<26}{flops / 1e12:>9.3f} TFLOPs {100 * flops / total:>6.1f} %")
    print("\nonce per evaluation, not per sample: forming p_V->D's product "
          + ", ".join(f"{size} {product_flops(size) / 1e9:.1f} GFLOPs" for size in LLMS))
    print("\nPixelLM / LISA (paper: 0.50 at 7B, 0.65 at 13B):")
    for size in LLMS:
        print(f"  {size}: {totals['PixelLM', size] / totals['LISA', size]:.7f}")
    print("PixelLM / LISA with free greedy decoding (complete_codebook_groups=False, as the release decodes):")
    for size in LLMS:
        free = sum(pixellm(size, args.prompt_tokens, args.answer_tokens, args.targets, complete_groups=False).values())
        print(f"  {size}: {free / totals['LISA', size]:.7f} (PixelLM-{size} {free / 1e12:.4f} TFLOPs, "
              f"completed groups {totals['PixelLM', size] / 1e12:.4f})")
    lisa_answer = args.answer_tokens - 5 * args.targets  # the same answer text, one [SEG] per target, not 6 tokens
    print(f"PixelLM / LISA with LISA's answer as the same text with one [SEG] per target ({lisa_answer} tokens):")
    for size in LLMS:
        shorter = sum(lisa(size, args.prompt_tokens, lisa_answer, args.targets).values())
        print(f"  {size}: {totals['PixelLM', size] / shorter:.4f} (LISA-{size} {shorter / 1e12:.2f} TFLOPs)")
    paper_convention(totals, llm, args.answer_tokens)


if __name__ == "__main__":
    main()
