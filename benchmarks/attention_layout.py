"""Packed attention, dense mask vs segmented, forward and backward: the measurements behind the cost model.

    python benchmarks/attention_layout.py [--threads N] [--repeats K]

For packed batches of many shapes (pairs of HH-RLHF-like lengths, few to many per row, short to long), one attention
layer with SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64, fp32) runs forward and backward
through transformers' sdpa attention function with the dense (R, 1, W, W) mask, and through
``dpo_dist.model.segmented_attention``. It prints each time, fits ``time = a * query-key pairs + b * kernel calls``
to all of them (least squares), so ``b / a`` is what one more call costs in pairs (``dpo_dist.data.packing.CALL_COST``),
and says how often :func:`dpo_dist.data.packing.segmented_pays` picks the faster layout and what its picks cost
against always taking the faster one.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from dpo_dist.data.packing import CALL_COST, PackedPairCollator, packed_mask, segmented_pays  # noqa: E402
from dpo_dist.model.segmented_attention import segmented_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def pairs_of(rng: random.Random, n: int, prompt: int, response: int) -> list[dict]:
    """n pairs with log-normal lengths around ``prompt`` / ``response`` tokens."""
    def length(mean: int) -> int:
        return max(1, min(4 * mean, round(rng.lognormvariate(0, 0.6) * mean)))
    return [{"prompt_input_ids": [5] * length(prompt), "chosen_input_ids": [6] * length(response),
             "rejected_input_ids": [7] * length(response)} for _ in range(n)]


def dense(module, query, key, value, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=HEAD_DIM ** -0.5)[0]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = HEADS // KV_HEADS, True
    cases = [(n, p, r, share) for n in (2, 4, 8, 16) for p, r in ((30, 20), (110, 60), (256, 128), (512, 256))
             for share in (True, False)]
    rows = []
    print(f"{args.threads} threads, {HEADS} heads ({KV_HEADS} key/value), head dim {HEAD_DIM}, fp32, forward+backward;"
          f" median of {args.repeats}")
    print("| pairs | prompt/response | shared | rows x width | dense ms | segmented ms | dense/seg | "
          "pairs dense / seg (M) | calls | cost model picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, p, r, share in cases:
        batch = PackedPairCollator(0, share_prompt=share, attention_layout="segmented")(pairs_of(rng, n, p, r))
        spans = tuple(map(tuple, batch["attention_spans"].tolist()))
        mask = packed_mask(batch["segment_ids"], batch["branch_ids"], batch["position_ids"])
        R, W = batch["input_ids"].shape
        # (R, W, H, D) in memory, as transformers' projections leave them
        q = torch.randn(R, W, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
        k = torch.randn(R, W, KV_HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
        v = torch.randn(R, W, KV_HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
        grad = torch.randn(R, W, HEADS, HEAD_DIM)

        def run_dense():
            dense(module, q, k, v, mask).backward(grad)

        def run_segmented():
            segmented_attention(q, k, v, spans, scale=HEAD_DIM ** -0.5).backward(grad)

        t_dense, t_seg = timed(run_dense, args.repeats), timed(run_segmented, args.repeats)
        dense_pairs = R * W * W
        seg_pairs = sum((sp[2] + sp[3] + sp[5]) ** 2 + (sp[4] * (sp[2] + sp[4]) if sp[4] else 0) for sp in spans)
        calls = sum(1 + bool(sp[4]) for sp in spans)
        pick = "segmented" if segmented_pays(spans, R, W) else "dense"
        rows.append((t_dense, t_seg, dense_pairs, seg_pairs, calls, R, pick))
        print(f"| {n} | {p}/{r} | {share} | {R} x {W} | {t_dense * 1e3:.1f} | {t_seg * 1e3:.1f} | {t_dense / t_seg:.2f} "
              f"| {dense_pairs / 1e6:.2f} / {seg_pairs / 1e6:.2f} | {calls} | {pick} |", flush=True)
    # time = a * pairs + b * calls, over both layouts (dense: R calls' worth of rows in one call, counted as 1)
    x = torch.tensor([[d, 1.0] for d, *_ in [(r[2],) for r in rows]] + [[r[3], r[4]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[0] for r in rows] + [r[1] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    right = sum((r[6] == "segmented") == (r[1] < r[0]) for r in rows)
    picked = sum(r[1] if r[6] == "segmented" else r[0] for r in rows)
    best = sum(min(r[0], r[1]) for r in rows)
    always_dense = sum(r[0] for r in rows)
    print(f"\nfit: {a * 1e9:.2f} ns a query-key pair, {b * 1e3:.3f} ms a call: one call costs {b / a:,.0f} pairs "
          f"(CALL_COST in use: {CALL_COST:,})")
    print(f"cost model: picks the faster layout in {right} of {len(rows)} batches; its picks take {picked:.2f} s in all, "
          f"{picked / best:.3f}x the faster of the two each time, {picked / always_dense:.3f}x always dense")


if __name__ == "__main__":
    main()
