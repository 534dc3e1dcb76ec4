"""Mask evaluation: our batched IoU matrices + Hungarian matching vs a per-sample Python loop.

Both score the same questions (1-6 ground-truth masks each, 256x256, some with ignored pixels;
predictions are the targets shifted and shuffled, with a missing or an extra mask in some
questions) until 10,000 ground-truth masks are seen: IoU of every (prediction, target) pair,
the Hungarian assignment (scipy), unmatched masks against empty ones, gIoU and cIoU. The loop
computes each pair's I and U with its own tensor ops, as a straightforward per-question
evaluation does; ours bit-packs every mask once and counts all pairs of a question in one operation.
Questions are built chunk by chunk (untimed) and each chunk is timed by both, side by side, ``--repeats``
times alternately; each path's fastest run per chunk counts (the machine is shared and noisy).
Checks that both give identical pairs (indices, I, U) and the same gIoU / cIoU.

Run: python benchmarks/metrics.py [--masks 10000] [--size 256] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pixellm.evaluation.matching import MatchedPairs, concatenate, match_batch, pairwise_counts
from pixellm.metrics.iou import PairedMaskIoU, intersection_union


def make_question(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S, S) bool predictions and (G, S, S) ground truth in {0, 1, 255} of one question."""
    count = int(torch.randint(1, 7, (1,), generator=generator))
    corners = torch.randint(0, size - 40, (count, 2), generator=generator)
    sides = torch.randint(16, 40, (count, 2), generator=generator)
    truth = torch.zeros(count, size, size, dtype=torch.uint8)
    for k, ((y, x), (h, w)) in enumerate(zip(corners.tolist(), sides.tolist(), strict=True)):
        truth[k, y : y + h, x : x + w] = 1
    if bool(torch.rand(1, generator=generator) < 0.3):
        truth[:, :, :4] = 255  # an ignored band
    shift = torch.randint(-6, 7, (count, 2), generator=generator)
    pred = torch.stack([torch.roll(truth[k] == 1, tuple(shift[k].tolist()), (0, 1)) for k in range(count)])
    pred = pred[torch.randperm(count, generator=generator)]
    change = float(torch.rand(1, generator=generator))
    if change < 0.2 and count > 1:
        pred = pred[1:]  # a missing prediction
    elif change > 0.8:
        pred = torch.cat([pred, torch.roll(pred[:1], 50, 1)])  # an extra prediction
    return pred, truth


def loop_evaluate(preds: list[torch.Tensor], truths: list[torch.Tensor]) -> tuple[list[tuple], list[float]]:
    """The per-sample loop: per question, per (prediction, target) pair, then scipy; sums in Python."""
    pairs, sums = [], [0.0, 0.0, 0.0, 0.0]  # I, U, IoU, count
    for pred, truth in zip(preds, truths, strict=True):
        num_pred, num_gt = pred.shape[0], truth.shape[0]
        inter = np.zeros((num_pred, num_gt))
        union = np.zeros((num_pred, num_gt))
        for p in range(num_pred):
            for g in range(num_gt):
                i, u = intersection_union(pred[p : p + 1], truth[g : g + 1])
                inter[p, g], union[p, g] = i.item(), u.item()
        cost = 1 - np.where(union == 0, 1.0, inter / (union + 1e-5))
        rows, cols = linear_sum_assignment(cost)
        question = [(int(p), int(g), inter[p, g], union[p, g]) for p, g in zip(rows, cols, strict=True)]
        question += [(p, -1, 0.0, float(pred[p].sum())) for p in range(num_pred) if p not in rows]
        question += [(-1, g, 0.0, float((truth[g] == 1).sum())) for g in range(num_gt) if g not in cols]
        for _, _, i, u in question:
            sums[0] += i
            sums[1] += u
            sums[2] += 1.0 if u == 0 else i / (u + 1e-5)
            sums[3] += 1
        pairs += question
    return pairs, sums


def batched_evaluate(
    preds: list[torch.Tensor], truths: list[torch.Tensor], batch: int, metric: PairedMaskIoU
) -> list[MatchedPairs]:
    """Ours: ``match_batch`` per batch of questions, one metric update per batch."""
    pairs = []
    for start in range(0, len(preds), batch):
        matched = match_batch(preds[start : start + batch], truths[start : start + batch])
        metric.update(*concatenate(matched))
        pairs += matched
    return pairs


def as_tuples(matched: list[MatchedPairs]) -> list[tuple]:
    """(pred, gt, I, U) of every pair, for the comparison with the loop (not timed)."""
    return [
        pair
        for m in matched
        for pair in zip(m.pred_index.tolist(), m.gt_index.tolist(), m.intersection.tolist(), m.union.tolist(), strict=True)
    ]


def loop_counts(preds: list[torch.Tensor], truths: list[torch.Tensor]) -> None:
    for pred, truth in zip(preds, truths, strict=True):
        for p in range(pred.shape[0]):
            for g in range(truth.shape[0]):
                intersection_union(pred[p : p + 1], truth[g : g + 1])


def batched_counts(preds: list[torch.Tensor], truths: list[torch.Tensor], batch: int) -> None:
    for start in range(0, len(preds), batch):
        pairwise_counts(preds[start : start + batch], truths[start : start + batch])


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=10_000, help="ground-truth masks in all")
    parser.add_argument("--size", type=int, default=256, help="mask side in pixels")
    parser.add_argument("--batch", type=int, default=64, help="questions per batch (ours)")
    parser.add_argument("--chunk", type=int, default=256, help="questions built in memory at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path per chunk (fastest kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    metric = PairedMaskIoU()
    times = {"loop total": 0.0, "ours total": 0.0, "loop IoU": 0.0, "ours IoU": 0.0}
    loop_sums, seen, questions, identical = [0.0] * 4, 0, 0, True
    while seen < args.masks:
        preds, truths = [], []
        while len(preds) < args.chunk and seen < args.masks:
            pred, truth = make_question(generator, args.size)
            preds.append(pred)
            truths.append(truth)
            seen += truth.shape[0]
        questions += len(preds)
        best = dict.fromkeys(times, float("inf"))  # each path's fastest of the repeats on this chunk
        for repeat in range(args.repeats):  # the paths alternate, so that load changes hit both alike
            seconds, (loop_pairs, sums) = timed(lambda: loop_evaluate(preds, truths))  # noqa: B023
            best["loop total"] = min(best["loop total"], seconds)
            scored = metric if repeat == 0 else PairedMaskIoU()  # the scores count each question once
            seconds, ours_pairs = timed(lambda: batched_evaluate(preds, truths, args.batch, scored))  # noqa: B023
            best["ours total"] = min(best["ours total"], seconds)
            best["loop IoU"] = min(best["loop IoU"], timed(lambda: loop_counts(preds, truths))[0])  # noqa: B023
            best["ours IoU"] = min(best["ours IoU"], timed(lambda: batched_counts(preds, truths, args.batch))[0])  # noqa: B023
            identical &= loop_pairs == as_tuples(ours_pairs)
        loop_sums = [a + b for a, b in zip(loop_sums, sums, strict=True)]
        times = {name: times[name] + best[name] for name in times}
    scores = metric.compute()
    loop_giou = loop_sums[2] / loop_sums[3]
    loop_ciou = loop_sums[0] / loop_sums[1]
    print(f"{questions} questions, {seen} ground-truth masks of {args.size}x{args.size}, batches of {args.batch}, "
          f"fastest of {args.repeats} runs per chunk")
    print("| stage | per-sample loop (s) | ours, batched (s) | speed-up |\n|---|---|---|---|")
    for name in ("IoU", "total"):
        loop, ours = times[f"loop {name}"], times[f"ours {name}"]
        label = "IoU of all pairs" if name == "IoU" else "IoU + Hungarian + gIoU/cIoU"
        print(f"| {label} | {loop:.2f} | {ours:.2f} | {loop / ours:.1f}x |")
    print(f"pairs identical (indices, I, U): {identical}")
    ours_giou = float(metric.iou_sum[0] / metric.count[0])  # float64, before compute()'s float32
    ours_ciou = float(metric.intersection[0] / metric.union[0])
    print(f"gIoU: loop {loop_giou:.12f}, ours {ours_giou:.12f} (compute(): {float(scores['gIoU']):.6f})")
    print(f"cIoU: loop {loop_ciou:.12f}, ours {ours_ciou:.12f} (compute(): {float(scores['cIoU']):.6f})")
    if not identical or abs(loop_giou - ours_giou) > 1e-12 or abs(loop_ciou - ours_ciou) > 1e-12:
        raise SystemExit("the two evaluations disagree")


if __name__ == "__main__":
    main()
