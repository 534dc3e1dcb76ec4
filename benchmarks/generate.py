"""Greedy generation: KV cache (ours) vs recomputing the whole sequence every step (the release).

Prints, per model size, the time of both side by side in one run and their ratio; checks that the
two produce the same tokens. Run: python benchmarks/generate.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from pixellm.model.lmm import LlavaLMM

SIZES = {
    "tiny (128 x 2 layers)": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "mid (512 x 8 layers)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
}
IMAGE_ID = 999


def recompute(lmm: LlavaLMM, ids: torch.Tensor, image: torch.Tensor, steps: int) -> torch.Tensor:
    """The release's decoding: a full forward over the growing sequence for every new token."""
    out = []
    for _ in range(steps):
        inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
        token = lmm.lm_head(lmm(inputs)[:, -1]).argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
    return torch.stack(out, 1)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"greedy decoding of {args.new_tokens} tokens after {args.prompt_tokens} text + "
          f"{args.image_tokens} image tokens, batch 1, best of {args.repeats}, CPU fp32")
    print(f"{'model':<24}{'recompute s':>12}{'KV cache s':>12}{'speed-up':>10}  same tokens")
    for name, size in SIZES.items():
        torch.manual_seed(0)
        config = dict(vocab_size=1000, num_key_value_heads=size["num_attention_heads"],
                      max_position_embeddings=512, **size)
        lmm = LlavaLMM(text_config=config, vision_channels=64).eval()
        ids = torch.randint(0, 998, (1, args.prompt_tokens))
        ids[0, 1] = IMAGE_ID
        image = torch.randn(1, args.image_tokens, size["hidden_size"])
        with torch.no_grad():
            inputs = lmm.build_inputs(ids, torch.ones_like(ids), image, IMAGE_ID)
            slow, slow_ids = timed(partial(recompute, lmm, ids, image, args.new_tokens), args.repeats)
            fast, (fast_ids, _) = timed(partial(lmm.generate, inputs, args.new_tokens, -1), args.repeats)
        same = torch.equal(slow_ids, fast_ids)
        print(f"{name:<24}{slow:>12.3f}{fast:>12.3f}{slow / fast:>9.1f}x  {same}")


if __name__ == "__main__":
    main()
