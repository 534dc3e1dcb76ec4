"""Greedy generation: KV cache (ours) vs recomputing the whole sequence every step (the release).

The prompt is PixelLM's: P = 256 image tokens (32x32 CLIP patches pooled to 16x16, REFERENCE.md) spliced
into ~64 text tokens. Recomputation re-runs the LLM over all of them at every new token; the cache runs
them once (the prefill) and then one token per step, so the ratio grows with the prompt.

Prints, per model size, both times side by side in one run, their ratio, the cached path split into the
prefill and the mean decoding step, and whether both decode the same tokens. Ours decodes a Llama over a
static cache (``pixellm.model.decoding``); a third path, transformers' ``DynamicCache``
(``generate(..., static_cache=False)``), shows what that gains ("static gain" = DynamicCache / ours).
One CPU thread by default (``--device cuda``: a GPU, each run timed to its last kernel; ours then replays its
decoding step as a CUDA graph, and a fourth path, the same static cache run eagerly
(``generate(..., cuda_graph=False)``), shows what the graph gains: "graph gain" = eager / ours). The CPU machine
is shared and noisy, so the paths run alternately ``--repeats`` times and each figure is a median;
"fastest" is the ratio of the two paths' fastest runs, the least disturbed by other load (a cached step
is mostly per-call overhead, which suffers from a busy machine more than the recomputation's matmuls).
A second table times one codebook group (``generate(..., group=...)``, PixelLMTask's completed groups): an
answer of 7 ids whose first six are a group, decoded freely (six one-token steps after the prefill) and with
the group completed (one six-token step), the group being the six ids free decoding writes, so both give the
same ids; after a short prompt (8 text ids, 1 image token), whose prefill, timed in the same repeat, is
subtracted from both. Both run their steps eagerly (on a GPU a call captures its
graph at its first one-token step, which only the free run has: it would pay the capture alone).
Run: python benchmarks/generate.py [--new-tokens 64 --prompt-tokens 64 --image-tokens 256 --repeats 5]
     python benchmarks/generate.py --sizes 7B --device cuda --dtype bfloat16   (LLaVA-7B's LLM on a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pixellm.model.lmm import LlavaLMM

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000),
    "mid": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=1000),
    # LLaVA-7B's LLM (Llama-7B shape, flops.py), random weights: for a GPU (--device cuda --dtype bfloat16)
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32007),
}
IMAGE_ID = 999
GROUP = 6  # ids of a codebook group, L = 2 x N = 3
SHORT = 8  # text ids of the group table's prompt


def build(name: str, device: torch.device, dtype: torch.dtype, prompt_tokens: int, image_tokens: int,
          compile_layers: bool = False) -> tuple[LlavaLMM, torch.Tensor, torch.Tensor]:
    """The LLM of size ``name`` with random weights (seed 0), prompt ids (1, S) with the image placeholder at
    position 1, and image tokens (1, P, H)."""
    size = SIZES[name]
    torch.manual_seed(0)
    config = dict(num_key_value_heads=size["num_attention_heads"], max_position_embeddings=1024, **size)
    with device:
        lmm = LlavaLMM(text_config=config, vision_channels=64, compile_layers=compile_layers).to(dtype).eval()
        ids = torch.randint(0, 998, (1, prompt_tokens))
        ids[:, 1] = IMAGE_ID
        image = torch.randn(1, image_tokens, size["hidden_size"], dtype=dtype)
    return lmm, ids, image


def recompute(lmm: LlavaLMM, ids: torch.Tensor, image: torch.Tensor, steps: int) -> torch.Tensor:
    """The release's decoding: a full forward over the growing sequence for every new token."""
    out = []
    for _ in range(steps):
        inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
        token = lmm.lm_head(lmm(inputs)[:, -1]).argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
    return torch.stack(out, 1)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of ``fn()`` (with the device's queued work finished) and its result."""
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens, the image placeholder included")
    parser.add_argument("--image-tokens", type=int, default=256, help="P, image tokens spliced into the prompt")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each path (medians)")
    parser.add_argument("--sizes", default="tiny,mid", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--device", default="cpu", help="cpu (1 thread) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile-layers", action="store_true", help="LlavaLMM(compile_layers=True): each decoder "
                        "layer through torch.compile (compiled in the warm-up; a GPU, or a C++ compiler on CPU). It "
                        "reaches the recompute and DynamicCache paths only: the static cache calls the layers' parts")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - SIZES.keys():
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {', '.join(SIZES)}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = "CPU, 1 thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    torch.set_num_threads(1)
    print(f"greedy decoding of {args.new_tokens} tokens after {args.prompt_tokens} text + {args.image_tokens} "
          f"image tokens, batch 1, {where}, {args.dtype}{', compiled layers' * args.compile_layers}, medians of {args.repeats} alternating runs")
    graphs = device.type == "cuda"
    print(f"{'model':<24}{'recompute s':>12}{'KV cache s':>11}{'speed-up':>9}{'fastest':>9}{'prefill s':>10}"
          f"{'cached step ms':>15}{'DynamicCache s':>15}{'static gain':>12}"
          + f"{'eager static s':>15}{'graph gain':>11}" * graphs + "  same tokens as ours")
    group_rows = []
    for name in sizes:
        size = SIZES[name]
        lmm, ids, image = build(name, device, dtype, args.prompt_tokens, args.image_tokens, args.compile_layers)
        with torch.no_grad():
            inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
            lmm.generate(inputs, 4, -1)  # warm-up
            recompute(lmm, ids, image, 2)
            # the group table's prompt: short (8 text ids, 1 image token), so that its prefill, subtracted, is small
            short = lmm.build_inputs(ids[:, :SHORT], torch.ones_like(ids[:, :SHORT]), image[:, :1], IMAGE_ID)
            group = lmm.generate(short, GROUP, -1)[0][0]  # (6,) the ids free decoding starts with
            times = {"prefill": [], "cache": [], "recompute": [], "dynamic": [], "eager": [], "free": [], "completed": []}
            for _ in range(args.repeats):  # alternate the paths so that load changes hit both alike
                times["prefill"].append(timed(lambda: lmm.generate(inputs, 1, -1), device)[0])  # noqa: B023
                seconds, (fast_ids, _) = timed(lambda: lmm.generate(inputs, args.new_tokens, -1), device)  # noqa: B023
                times["cache"].append(seconds)
                seconds, slow_ids = timed(lambda: recompute(lmm, ids, image, args.new_tokens), device)  # noqa: B023
                others = {"recompute": slow_ids}  # every path's ids, compared with ours
                times["recompute"].append(seconds)
                seconds, (dynamic_ids, _) = timed(lambda: lmm.generate(inputs, args.new_tokens, -1, static_cache=False),  # noqa: B023
                                                  device)
                times["dynamic"].append(seconds)
                others["DynamicCache"] = dynamic_ids
                short_prefill = timed(lambda: lmm.generate(short, 1, -1), device)[0]  # noqa: B023
                seconds, (free_ids, _) = timed(lambda: lmm.generate(short, GROUP + 1, -1, cuda_graph=False), device)  # noqa: B023
                times["free"].append(seconds - short_prefill)
                seconds, (group_ids, _) = timed(lambda: lmm.generate(short, GROUP + 1, -1, cuda_graph=False, group=group),  # noqa: B023
                                              device)
                times["completed"].append(seconds - short_prefill)
                if graphs:
                    seconds, (eager_ids, _) = timed(lambda: lmm.generate(inputs, args.new_tokens, -1, cuda_graph=False),  # noqa: B023
                                                    device)
                    times["eager"].append(seconds)
                    others["eager"] = eager_ids
        prefill, fast, slow, dynamic = (statistics.median(times[k]) for k in ("prefill", "cache", "recompute", "dynamic"))
        step_ms = 1e3 * (fast - prefill) / max(args.new_tokens - 1, 1)
        best = min(times["recompute"]) / min(times["cache"])  # each path's fastest run: the least disturbed
        label = f"{name} ({size['hidden_size']} x {size['num_hidden_layers']} layers)"
        same = ", ".join(f"{path} {torch.equal(other, fast_ids)}" for path, other in others.items())
        eager = f"{statistics.median(times['eager']):>15.2f}{statistics.median(times['eager']) / fast:>10.2f}x" if graphs else ""
        print(f"{label:<24}{slow:>12.2f}{fast:>11.2f}{slow / fast:>8.1f}x{best:>8.1f}x{prefill:>10.3f}{step_ms:>15.1f}"
              f"{dynamic:>15.2f}{dynamic / fast:>11.2f}x{eager}  {same}")
        free, completed = (1e3 * statistics.median(times[k]) for k in ("free", "completed"))
        group_rows.append(f"{label:<24}{free:>10.1f}{completed:>15.1f}{free / completed:>9.1f}x  {torch.equal(free_ids, group_ids)}")
    print(f"\none codebook group of {GROUP} ids (+ 1 id after it), decoding after the prefill, medians")
    print(f"{'model':<24}{'free ms':>10}{'completed ms':>15}{'speed-up':>10}  same ids")
    print("\n".join(group_rows))


if __name__ == "__main__":
    main()
