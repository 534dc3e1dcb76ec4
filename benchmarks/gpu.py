"""PixelLM-7B training throughput and MFU on one GPU: single device, FSDP with 1 device, and variants.

Not part of the test suite (it needs a CUDA card for the real size). Builds PixelLM-7B (REFERENCE.md: CLIP
ViT-L/14 at 448 px, frozen; LLaVA-7B-shaped Llama with LoRA r=8 on q/v and gradient checkpointing; L=2, N=3
codebook; release-sized decoder) with random weights directly on the GPU in bf16, a synthetic 32,000-word
tokenizer, and synthetic batches (prompt text + 256 image tokens + an answer with ``--targets`` targets), then
runs real ``lightning.Trainer`` steps with ``precision="bf16-true"`` and gradient clipping at 1.0.

Prints per run: step time, samples/s, tokens/s (LLM sequence positions), peak GPU memory, MFU = model
FLOPs per sample x samples/s / the card's dense bf16 peak (H100/H200 SXM: 989 TFLOPs), and whether the base
vocabulary rows of ``embed_tokens`` stayed unchanged while the added rows learned (the LoRA rule, which
must hold under every strategy). Model FLOPs come from ``benchmarks/flops.py`` (FlopCounterMode on the meta
device, same shapes): vision x1 (frozen, forward only), LLM x2 (forward + activation gradients; the frozen
base weights get no weight gradient, LoRA's are negligible), codebook/projection/decoder x3 (forward + both
gradients). The recomputation of gradient checkpointing is not model FLOPs and is not counted.

Runs (``--runs``, comma-separated): single, fsdp, no-ckpt (without gradient checkpointing), compiled
(``LlavaLMM(compile_layers=True)``), compiled-no-ckpt. ``--profile`` profiles two steps of the plain
checkpointed run with torch.profiler and prints the kernels that took the GPU time.

Measured on an H100 80GB HBM3 (2026-11-27, batch 16): MFU 28.0 % single, 20.6 % FSDP-1, 36.2 % without
checkpointing, 37.9 % compiled, 49.6 % compiled without checkpointing (README, Performance).

Needs torch, lightning, transformers, peft, timm, torchmetrics, tokenizers, jsonargparse.
Run: python benchmarks/gpu.py            (PixelLM-7B; about 1.5 minutes on an H100 including construction)
     python benchmarks/gpu.py --tiny     (a tiny model on CPU: a smoke test of this script)
"""

from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import time
import traceback
from pathlib import Path

import lightning
import peft
import torch
import transformers
from flops import CLIP_L14, LLMS, SAM_DIM, pixellm_parts
from lightning import Callback, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from step import PARTS, label_parts
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from pixellm.model.codebook import SegmentationCodebook
from pixellm.model.decoder import CascadedPixelDecoder
from pixellm.model.lmm import LlavaLMM, LoraSettings
from pixellm.model.projection import VisionDecoderProjection
from pixellm.model.vision import CLIPVisionEncoder
from pixellm.task import PixelLMTask

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM
SHAPES = {
    "PixelLM-7B": dict(clip=CLIP_L14, image_size=448, feature_layers=[-2, -11], pool=16, vocab=32000,
                       llm=dict(LLMS["7B"], num_key_value_heads=32, max_position_embeddings=4096),
                       decoder=dict(dim=SAM_DIM)),
    "tiny": dict(clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=8, image_size=64), image_size=64, feature_layers=[-1, 1], pool=None,
                 vocab=512, llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512),
                 decoder=dict(dim=32, depth=1, num_heads=2, mlp_dim=64)),
}
GROUP = 6  # codebook tokens per target, L * N


def write_tokenizer(directory: Path, vocab_size: int) -> str:
    """A word-level tokenizer of ``vocab_size`` entries (Llama's size for the 7B), saved as a local directory."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    tokenizer.save_pretrained(directory)
    return str(directory)


def build_parts(shape: dict, gradient_checkpointing: bool, compile_layers: bool = False) -> dict:
    """The five PixelLM parts of ``shape``, on the current default device and dtype."""
    vision = CLIPVisionEncoder(config=shape["clip"], image_size=shape["image_size"],
                               feature_layers=shape["feature_layers"], trainable=False)
    channels, hidden = vision.out_channels, shape["llm"]["hidden_size"]
    lmm = LlavaLMM(text_config=dict(shape["llm"], vocab_size=shape["vocab"]), vision_channels=channels,
                   image_pool_size=shape["pool"], lora=LoraSettings(), gradient_checkpointing=gradient_checkpointing,
                   compile_layers=compile_layers)
    dim = shape["decoder"]["dim"]
    return dict(
        vision=vision,
        lmm=lmm,
        codebook=SegmentationCodebook(hidden_size=hidden, decoder_dim=dim, num_scales=2, tokens_per_scale=3),
        projection=VisionDecoderProjection(in_channels=channels, out_channels=dim, mlp_dim=2 * hidden,
                                           embed_dim=hidden),
        decoder=CascadedPixelDecoder(num_scales=2, **shape["decoder"]),
    )


def training_flops_per_sample(shape: dict, text_tokens: int, answer_tokens: int, targets: int) -> float:
    """Model FLOPs of one training sample (see the module docstring for the x1 / x2 / x3 rule)."""
    with torch.device("meta"):
        parts = build_parts(shape, gradient_checkpointing=False)
        parts["lmm"].extend_vocabulary(shape["vocab"] + 1 + GROUP)
    flops = pixellm_parts(*parts.values(), text_tokens, answer_tokens, targets, generation=False)
    multiplier = {"vision encoder": 1, "LLM (+ p_V->T, LM head)": 2}
    return float(sum(multiplier.get(part, 3) * value for part, value in flops.items()))


def synthetic_batch(task: PixelLMTask, batch_size: int, text_tokens: int, answer_tokens: int, targets: int,
                    image_size: int) -> dict:
    """One training batch in the collator's format: prompt with one image token, answer with the targets."""
    words = torch.arange(3, task.lmm.original_vocab_size).tolist()  # base words only: no image/codebook token
    generator = torch.Generator().manual_seed(0)
    prompt = torch.tensor(words)[torch.randint(len(words), (batch_size, text_tokens), generator=generator)]
    prompt[:, 1] = task.image_token_id
    answer = torch.tensor(words)[torch.randint(len(words), (batch_size, answer_tokens), generator=generator)]
    codes = torch.tensor(task.tokenizer.convert_tokens_to_ids(task.codebook.tokens))  # (6,)
    for k in range(targets):  # "<word> <6 codebook tokens>" per target, then words, then </s>
        answer[:, 1 + k * (GROUP + 1) : 1 + k * (GROUP + 1) + GROUP] = codes
    answer[:, -1] = task.tokenizer.eos_token_id
    input_ids = torch.cat([prompt, answer], dim=1)  # (B, T + A)
    labels = torch.cat([torch.full_like(prompt, -100), answer], dim=1)
    sizes = torch.tensor([[image_size, image_size]] * batch_size)
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "masks": [(torch.rand(targets, image_size, image_size, generator=generator) > 0.5).float()
                  for _ in range(batch_size)],
        "resized_sizes": sizes,
        "original_sizes": sizes.clone(),
        "padded": False,  # square images, as the collator would flag them
        "meta": [{"index": b} for b in range(batch_size)],
    }


class SameBatch(Dataset):
    """``length`` times the same ready-made batch (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


class StepTimer(Callback):
    """Wall time of every training step after ``warmup`` steps, synchronised with the GPU."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.start = warmup, [], 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Trainer, pl_module: PixelLMTask, batch: dict, batch_idx: int) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: PixelLMTask, outputs: object, batch: dict,
                           batch_idx: int) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


class StepProfiler(Callback):
    """torch.profiler over ``steps`` training steps from step ``start``; prints the ops and parts that took the time."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.stop, self.steps = start, start + steps - 1, steps
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        self.profiler = profile(activities=[ProfilerActivity.CPU, *cuda])

    def on_train_batch_start(self, trainer: Trainer, pl_module: PixelLMTask, batch: dict, batch_idx: int) -> None:
        if batch_idx == self.start:
            label_parts(pl_module)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer: Trainer, pl_module: PixelLMTask, outputs: object, batch: dict,
                           batch_idx: int) -> None:
        if batch_idx == self.stop:
            StepTimer._sync()
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages()
            sort = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(table.table(sort_by="self_" + sort, row_limit=30, max_name_column_width=60))
            for event in table:
                if event.key in PARTS:  # forward only: backward kernels are not inside the labels
                    print(f"{event.key:<16} forward {getattr(event, sort) / 1e3 / self.steps:8.1f} ms per step")


def vocabulary_rows(task: PixelLMTask) -> tuple[Tensor, Tensor]:
    """CPU copies of the embedding's base rows (first 1,000) and added rows (codebook, image token)."""
    weight = task.lmm.embed_tokens.weight.detach().cpu()
    base = task.lmm.original_vocab_size
    return weight[: min(base, 1000)].clone(), weight[base:].clone()


def run(name: str, strategy: object, args: argparse.Namespace, shape: dict, tokenizer: str,
        gradient_checkpointing: bool, compiled: bool = False) -> dict:
    """Build the task, train ``args.steps`` steps, return the measured figures."""
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    start = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device(device):
            task = PixelLMTask(**build_parts(shape, gradient_checkpointing, compiled), tokenizer=tokenizer,
                               optimizer=functools.partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95),
                                                           weight_decay=0.0))
    finally:
        torch.set_default_dtype(default_dtype)
    built = time.perf_counter() - start
    batch = synthetic_batch(task, args.batch_size, args.prompt_tokens, args.answer_tokens, args.targets,
                            shape["image_size"])
    length = batch["input_ids"].shape[1] - 1 + task.lmm.num_image_tokens(task.vision.grid_size)  # S'
    timer = StepTimer(args.warmup)
    callbacks = [timer, StepProfiler(args.warmup, 2)] if args.profile else [timer]
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy,
                      precision="bf16-true" if cuda else "32-true", max_steps=args.steps, gradient_clip_val=1.0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_before, added_before = vocabulary_rows(task)
    trainer.fit(task, train_dataloaders=DataLoader(SameBatch(batch, args.steps), batch_size=None))
    base_after, added_after = vocabulary_rows(task)
    step = sorted(timer.times)[len(timer.times) // 2]  # median
    result = {
        "run": name,
        "built s": built,
        "step s": step,
        "samples/s": args.batch_size / step,
        "tokens/s": args.batch_size * length / step,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "base rows kept": torch.equal(base_before, base_after),
        "added rows learn": not torch.equal(added_before, added_after),
    }
    del task, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: smoke-test this script")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens, the image token included")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="Trainer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--runs", default="single,fsdp,no-ckpt", help="comma-separated, from single, fsdp, "
                        "no-ckpt (without gradient checkpointing), compiled (decoder layers through torch.compile), "
                        "compiled-no-ckpt")
    parser.add_argument("--profile", action="store_true", help="one checkpointed single-device run, with a "
                        "torch.profiler table of two steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: "
                        "989 for H100/H200)")
    args = parser.parse_args()
    if args.answer_tokens < args.targets * (GROUP + 1) + 2:
        parser.error("--answer-tokens must hold a word and 6 codebook tokens per target, plus </s>")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the PixelLM-7B run needs a CUDA GPU; use --tiny for a CPU smoke test")
    shape = SHAPES["tiny" if args.tiny else "PixelLM-7B"]
    card = "CPU" if args.tiny else torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)
    flops = training_flops_per_sample(shape, args.prompt_tokens - 1, args.answer_tokens, args.targets)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"lightning {lightning.__version__}")
    print(f"{'tiny' if args.tiny else 'PixelLM-7B'} on {card}: batch {args.batch_size}, {args.prompt_tokens} prompt "
          f"+ {args.answer_tokens} answer tokens + image tokens, {args.targets} targets, {args.steps} steps "
          f"({args.warmup} warm-up), model FLOPs {flops / 1e12:.2f} TFLOPs per training sample")
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = write_tokenizer(Path(directory), shape["vocab"])
        runs = {
            "single": ("single device", "auto", True, False),
            "fsdp": ("FSDP, 1 device", FSDPStrategy(use_orig_params=True), True, False),
            "no-ckpt": ("single, no ckpt", "auto", False, False),
            "compiled": ("single, compiled", "auto", True, True),
            "compiled-no-ckpt": ("compiled, no ckpt", "auto", False, True),
        }
        chosen = ["single"] if args.profile else args.runs.split(",")
        if args.tiny and "fsdp" in chosen:
            chosen.remove("fsdp")
        results = []
        for key in chosen:
            name, strategy, checkpointing, compiled = runs[key]
            try:
                results.append(run(name, strategy, args, shape, tokenizer, checkpointing, compiled))
            except Exception:  # a failed run is reported, and the next one still runs
                traceback.print_exc()
                results.append({"run": name, "error": True})
            print(results[-1], flush=True)
    print(f"{'run':<16}{'built s':>8}{'step s':>8}{'samples/s':>10}{'tokens/s':>10}{'peak GiB':>9}{'MFU':>7}"
          f"{'base rows kept':>16}{'added rows learn':>18}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:<16} failed (traceback above)")
            continue
        mfu = f"{100 * flops * r['samples/s'] / peak:.1f}%" if peak else "n/a"
        print(f"{r['run']:<16}{r['built s']:>8.1f}{r['step s']:>8.3f}{r['samples/s']:>10.2f}{r['tokens/s']:>10.0f}"
              f"{r['peak GiB']:>9.1f}{mfu:>7}{str(r['base rows kept']):>16}{str(r['added rows learn']):>18}")
    print("model FLOPs leave out the recomputation of gradient checkpointing (see the module docstring)")
    if args.tiny:
        print("(--tiny: FSDP needs CUDA and was skipped; MFU needs a GPU's peak)")


if __name__ == "__main__":
    main()
