"""Packed attention, dense mask vs segmented, forward and backward: the measurements behind the cost model.

    python benchmarks/attention_layout.py [--threads N] [--repeats K]

For batches of many shapes (pairs with log-normal lengths, few to many, short to long, prompt shared or not), one
attention layer with SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64, fp32) runs forward and
backward through transformers' sdpa attention function with the dense (R, 1, W, W) mask over the rows the dense
layout packs (``choose_rows``), and through ``dpo_dist.model.segmented_attention`` over the one unpadded row of the
segmented layout. It prints each time and the positions each layout computes (the linear layers' work), fits
``time = a * query-key pairs + b * kernel calls`` to all the attention times (least squares), so ``b / a`` is what one
more call costs in pairs (``dpo_dist.attention_cost.CALL_COST``), and prints what
:func:`dpo_dist.attention_cost.segmented_pays` picks for each batch. The whole step's figures, dense against
segmented, come from ``benchmarks/vs_trl.py --variants default,dense-attention``.

    python benchmarks/attention_layout.py --model DIR --pairs outputs/bench-vs-trl/pairs_tokenized.jsonl

instead times the whole forward and backward of that model with LoRA r16 on all linear layers (fused as in
training) on each batch of 4 of those pairs (the token ids ``benchmarks/vs_trl.py`` writes), dense and segmented
alternating in one process, and prints the cost model's pick for each batch.
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

from dpo_dist.attention_cost import CALL_COST, segmented_pays  # noqa: E402
from dpo_dist.data.packing import PackedPairCollator  # noqa: E402
from dpo_dist.model.attention import packed_mask  # noqa: E402
from dpo_dist.model.segmented_attention import segmented_attention, span_sizes  # noqa: E402

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


def whole_model(model_dir: str, pairs_file: str, repeats: int, batch: int = 4) -> None:
    """Forward + backward of the model with LoRA on ``pairs_file``'s batches, each layout in turn (module docstring)."""
    from benchmarks.lora_model import forward_backward, load_lora_model, token_pairs

    model, pairs = load_lora_model(model_dir), token_pairs(pairs_file)

    def step(collated):
        forward_backward(model, collated)

    totals = {"dense": 0.0, "segmented": 0.0}
    print("| batch | dense rows x width | dense s | segmented width | segmented s | dense/seg | cost model picks |")
    print("|---|---|---|---|---|---|---|")
    for number, start in enumerate(range(0, len(pairs) - batch + 1, batch), 1):
        examples = pairs[start : start + batch]
        layouts = {name: PackedPairCollator(0, attention_layout=name)(examples) for name in totals}
        times = {name: [] for name in totals}
        for name in totals:  # once each first: warm
            step(layouts[name])
        for _ in range(repeats):
            for name in totals:
                started = time.perf_counter()
                step(layouts[name])
                times[name].append(time.perf_counter() - started)
        t = {name: statistics.median(times[name]) for name in totals}
        for name in totals:
            totals[name] += t[name]
        R, W = layouts["dense"]["input_ids"].shape
        parts = [tuple(len(e[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected")) for e in examples]
        pick = "segmented" if segmented_pays(parts, R, W) else "dense"
        print(f"| {number} | {R} x {W} | {t['dense']:.3f} | {layouts['segmented']['input_ids'].shape[1]} | "
              f"{t['segmented']:.3f} | {t['dense'] / t['segmented']:.3f} | {pick} |", flush=True)
    print(f"\nall batches: dense {totals['dense']:.2f} s, segmented {totals['segmented']:.2f} s "
          f"({totals['dense'] / totals['segmented']:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="time this model's whole forward and backward instead")
    parser.add_argument("--pairs", default=None,
                        help="with --model: token-id pairs (vs_trl.py's pairs_tokenized.jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        if not args.pairs:
            parser.error("--model needs --pairs (token-id pairs, as benchmarks/vs_trl.py writes them)")
        whole_model(args.model, args.pairs, min(args.repeats, 3))
        return
    rng = random.Random(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = HEADS // KV_HEADS, True
    cases = [(n, p, r, share) for n in (2, 4, 8, 16) for p, r in ((30, 20), (110, 60), (256, 128), (512, 256))
             for share in (True, False)]
    rows = []
    print(f"{args.threads} threads, {HEADS} heads ({KV_HEADS} key/value), head dim {HEAD_DIM}, fp32, forward+backward;"
          f" median of {args.repeats}")
    print("| pairs | prompt/response | shared | positions: dense rows x width / segmented | dense ms | segmented ms | "
          "dense/seg | pairs dense / seg (M) | calls | cost model picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, p, r, share in cases:
        pairs = pairs_of(rng, n, p, r)
        batch = PackedPairCollator(0, share_prompt=share, attention_layout="dense")(pairs)
        seg = PackedPairCollator(0, share_prompt=share, attention_layout="segmented")(pairs)
        spans = tuple(map(tuple, seg["attention_spans"].tolist()))
        mask = packed_mask(batch["segment_ids"], batch["branch_ids"], batch["position_ids"])
        R, W = batch["input_ids"].shape
        total = seg["input_ids"].shape[1]

        def inputs(rows, width):  # (R, W, H, D) in memory, as transformers' projections leave them
            return [torch.randn(rows, width, heads, HEAD_DIM).transpose(1, 2).requires_grad_()
                    for heads in (HEADS, KV_HEADS, KV_HEADS)]

        q, k, v = inputs(R, W)
        qs, ks, vs = inputs(1, total)
        grad, grad_seg = torch.randn(R, W, HEADS, HEAD_DIM), torch.randn(1, total, HEADS, HEAD_DIM)

        def run_dense():
            dense(module, q, k, v, mask).backward(grad)

        def run_segmented():
            segmented_attention(qs, ks, vs, spans, scale=HEAD_DIM ** -0.5).backward(grad_seg)

        t_dense, t_seg = timed(run_dense, args.repeats), timed(run_segmented, args.repeats)
        dense_pairs = R * W * W
        # spans: row, start, padding, prompt, response lengths (first block, then each later response alone)
        seg_pairs = sum((prompt + later[0] + padding) ** 2 + sum(n * (prompt + n) for n in later[1:])
                        for _, _, padding, prompt, *later in spans)
        calls = len(span_sizes(spans))
        parts = [tuple(sp[3:]) for sp in spans if not sp[2]]
        pick = "segmented" if segmented_pays(parts, R, W) else "dense"
        rows.append((t_dense, t_seg, dense_pairs, seg_pairs, calls, R, pick))
        print(f"| {n} | {p}/{r} | {share} | {R} x {W} / {total} | {t_dense * 1e3:.1f} | {t_seg * 1e3:.1f} | "
              f"{t_dense / t_seg:.2f} | {dense_pairs / 1e6:.2f} / {seg_pairs / 1e6:.2f} | {calls} | {pick} |",
              flush=True)
    # time = a * pairs + b * calls, over both layouts (dense: R calls' worth of rows in one call, counted as 1)
    x = torch.tensor([[r[2], 1.0] for r in rows] + [[r[3], r[4]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[0] for r in rows] + [r[1] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    faster = sum(r[1] < r[0] for r in rows)
    print(f"\nfit: {a * 1e9:.2f} ns a query-key pair, {b * 1e3:.3f} ms a call: one call costs {b / a:,.0f} pairs "
          f"(CALL_COST in use: {CALL_COST:,})")
    print(f"segmented attention faster in {faster} of {len(rows)} batches; all batches' attention "
          f"{sum(r[1] for r in rows):.2f} s segmented against {sum(r[0] for r in rows):.2f} s dense; the cost model picks segmented for "
          f"{sum(r[6] == 'segmented' for r in rows)} (it also counts the positions the dense rows' padding adds), "
          f"the layout whose attention was faster for {sum((r[6] == 'segmented') == (r[1] < r[0]) for r in rows)}")


if __name__ == "__main__":
    main()
