"""The CUDA-graph decoding step on a GPU (``pixellm.model.decoding.CudaGraphStep``), LLaVA-7B's LLM with random
weights: what a step's time is made of, and whether the graph decodes what the eager step decodes.

Per dtype, with the prompt of ``generate.py`` (64 text + 256 image tokens):
- replay: the captured step alone, 50 replays back to back (the GPU's time), ms per step;
- loop: the whole greedy loop per token (head, argmax, end check, embedding, replay), from
  ``generate(n)`` and ``generate(1)``; eager: the same loop with the step run eagerly (``cuda_graph=False``);
- bound: the LLM's weight bytes over the card's memory bandwidth, the least a batch-1 step can take;
- GEMM share: kernel time in matrix products over all kernel time of 10 replays (torch profiler);
- same ids: graph against eager decoding of 32 tokens on a batch of 2 (row 0 left padded), per row, and the
  largest state difference over the first 4 tokens relative to the largest state; below fp32, each path's
  states against an fp32 forward of the same weights over the tokens that path decoded.
Run: python benchmarks/gpu_decoding.py [--size 7B --dtypes bfloat16,float32]   (needs CUDA; ~1 min on an H100)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from generate import IMAGE_ID, SIZES, build
from torch.profiler import ProfilerActivity, profile

from pixellm.model.decoding import CudaGraphStep, StaticLlamaDecoder

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, HBM of the SXM cards
GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "splitkreduce", "cublas")


def seconds(fn, repeats: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` back-to-back calls, timed to the last kernel."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def captured_step(lmm, inputs, new_tokens: int) -> tuple[CudaGraphStep, tuple]:
    """A step captured after the prompt, and inputs for it (the first decoding slot, rewritten at each replay)."""
    prompt = inputs.inputs_embeds.shape[1]
    decoder = StaticLlamaDecoder(lmm.language_model, inputs.attention_mask.bool(), prompt + new_tokens - 1)
    decoder.forward(inputs.inputs_embeds, inputs.position_ids, torch.arange(prompt, device="cuda"), span=prompt)
    step = CudaGraphStep(decoder)
    arguments = (inputs.inputs_embeds[:, -1:].clone(), inputs.position_ids[:, -1:] + 1,
                 torch.full((1,), prompt, device="cuda"))
    step(*arguments)  # the eager first step and the capture
    return step, arguments


def gemm_share(step: CudaGraphStep, arguments: tuple) -> float:
    """The matrix products' share of the kernel time of 10 replays."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(10):
            step(*arguments)
        torch.cuda.synchronize()
    kernels = [event for event in profiler.key_averages() if event.self_device_time_total > 0]
    gemm = sum(e.self_device_time_total for e in kernels if any(k in e.key.lower() for k in GEMM_KERNELS))
    return gemm / sum(e.self_device_time_total for e in kernels)


def agreement(lmm, dtype: torch.dtype, prompt_tokens: int, image_tokens: int) -> str:
    """Graph vs eager decoding of 32 tokens on a left-padded batch of 2: same ids per row, the relative state
    gap over the first 4 tokens, and below fp32 each path's gap to an fp32 forward of the same weights over
    the tokens it decoded (teacher forced), so that the two paths' rounding can be weighed."""
    device = lmm.lm_head.weight.device
    ids = torch.randint(0, 998, (2, prompt_tokens), device=device, generator=torch.Generator(device).manual_seed(1))
    ids[:, 1] = IMAGE_ID
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    image = torch.randn(2, image_tokens, lmm.hidden_size, device=device, dtype=dtype)
    decoded = {"graph": lmm.generate(lmm.build_inputs(ids, mask, image, IMAGE_ID), 32, -1),
               "eager": lmm.generate(lmm.build_inputs(ids, mask, image, IMAGE_ID), 32, -1, cuda_graph=False)}
    (graph_ids, graph_states), (eager_ids, eager_states) = decoded.values()
    row = f"{(graph_ids == eager_ids).all(1).tolist()}, {gap(graph_states[:, :4], eager_states[:, :4]):.1e}"
    if dtype == torch.float32:
        return row
    reference = copy.deepcopy(lmm).float()
    gaps = []
    for path, (new_ids, states) in decoded.items():  # (B, n), (B, n, H)
        sequence = torch.cat([ids, new_ids[:, :-1]], 1)  # the state emitting token i sits at S' - 1 + i
        inputs = reference.build_inputs(sequence, torch.cat([mask, torch.ones_like(new_ids[:, :-1])], 1),
                                        image.float(), IMAGE_ID)
        with torch.no_grad():
            expected = reference(inputs)[:, -new_ids.shape[1]:]  # (B, n, H)
        gaps.append(f"{path} {gap(states.float(), expected):.1e}")
    return f"{row}; vs fp32 over all 32: {', '.join(gaps)}"


def gap(states: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest expected value."""
    return ((states - expected).abs().max() / expected.abs().max()).item()


def measure(args: argparse.Namespace, dtype: torch.dtype, bandwidth: float | None) -> str:
    """One row of the table for ``dtype``."""
    lmm, ids, image = build(args.size, torch.device("cuda"), dtype, args.prompt_tokens, args.image_tokens)
    n = args.new_tokens
    with torch.inference_mode():
        inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
        step, arguments = captured_step(lmm, inputs, n)
        replay = seconds(lambda: step(*arguments), repeats=50)
        share = gemm_share(step, arguments)
        prefill = seconds(lambda: lmm.generate(inputs, 1, -1))
        loop = (seconds(lambda: lmm.generate(inputs, n, -1)) - prefill) / (n - 1)
        eager = (seconds(lambda: lmm.generate(inputs, n, -1, cuda_graph=False)) - prefill) / (n - 1)
    agree = agreement(lmm, dtype, args.prompt_tokens, args.image_tokens)  # outside inference mode: it copies the model
    weights = sum(p.numel() * p.element_size() for p in lmm.language_model.parameters())
    bound = f"{1e3 * weights / bandwidth:>9.2f}" if bandwidth else f"{'n/a':>9}"
    name = str(dtype).removeprefix("torch.")
    return (f"{name:<10}{1e3 * replay:>10.2f}{1e3 * loop:>9.2f}{1e3 * eager:>9.2f}{bound}{100 * share:>10.1f}%"
            f"{eager / loop:>10.2f}x  {agree}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7B", choices=list(SIZES))
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA graphs)")
    card = torch.cuda.get_device_name()
    bandwidth = next((value for name, value in BANDWIDTH.items() if name in card), None)
    print(f"decoding step of the {args.size} LLM after {args.prompt_tokens} text + {args.image_tokens} image tokens, "
          f"batch 1, {card}, {torch.__version__}")
    print(f"{'dtype':<10}{'replay ms':>10}{'loop ms':>9}{'eager ms':>9}{'bound ms':>9}{'GEMM share':>11}"
          f"{'graph gain':>11}  same ids (graph vs eager, batch 2), state gap")
    for name in args.dtypes.split(","):
        print(measure(args, getattr(torch, name), bandwidth))
        torch.cuda.empty_cache()  # the model of this dtype is gone


if __name__ == "__main__":
    main()
