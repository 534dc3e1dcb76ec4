"""p_V->D inference at the release's sizes: ours (Linear(M, E) and Conv1x1(E -> D) as one (D, M) product)
vs the layers applied in turn, as the release does. (Training keeps the layer-by-layer order; see
``pixellm.model.projection``.)

PixelLM-7B's projection (C = 1024, M = 2H = 8192, E = H = 4096, D = 256) on both 32x32 CLIP maps of
``--batch`` images, forward without gradients, both paths alternately ``--repeats`` times on the same
module; medians, their ratio, and the largest difference between the two outputs. "ours" is the first call of
an evaluation, which forms the product; "ours, kept" a later one, in eval mode, which reuses it.

Run: python benchmarks/projection.py [--hidden 4096 --batch 1 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pixellm.model.projection import VisionDecoderProjection


def layer_by_layer(projection: VisionDecoderProjection, maps: list[Tensor]) -> list[Tensor]:
    """The release's order: the token MLP, then the neck, on each map."""
    return [projection.neck(projection.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)) for x in maps]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="H, the LLM width (4096: 7B, 5120: 13B)")
    parser.add_argument("--batch", type=int, default=1, help="images; each has two 32x32 maps")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each path (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both paths)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    projection = VisionDecoderProjection(in_channels=1024, out_channels=256, mlp_dim=2 * args.hidden,
                                         embed_dim=args.hidden)
    maps = [torch.randn(args.batch, 1024, 32, 32) for _ in range(2)]  # L x (B, C, h, w)
    ours, reference = projection(maps), layer_by_layer(projection, maps)
    difference = max(float((a - b).abs().max()) for a, b in zip(ours, reference, strict=True))

    print(f"p_V->D, C=1024 M={2 * args.hidden} E={args.hidden} D=256, {args.batch} image(s) x 2 maps of 32x32, "
          f"CPU fp32, {args.threads} thread(s), forward without gradients, medians of {args.repeats} alternating runs")
    times = {"ours": [], "release": [], "kept": []}
    for _ in range(args.repeats):
        times["release"].append(seconds(lambda: layer_by_layer(projection, maps)))
        projection.train().eval()  # as Lightning does around an evaluation: the product is formed anew
        times["ours"].append(seconds(lambda: projection(maps)))
        times["kept"].append(seconds(lambda: projection(maps)))
    release, ours_time, kept = (statistics.median(times[name]) for name in ("release", "ours", "kept"))
    print(f"layer by layer {release:.3f} s, ours {ours_time:.3f} s, speed-up {release / ours_time:.2f}x; "
          f"ours, kept {kept:.3f} s, speed-up {release / kept:.2f}x")
    print(f"largest |ours - layer by layer| over the outputs (LayerNorm-scaled, ~N(0, 1)): {difference:.1e}")


if __name__ == "__main__":
    main()
