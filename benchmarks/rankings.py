"""Four rated completions per prompt, trained four ways, side by side: tokens through the model per row and pairs a
second, a CPU forward and backward of the whole model.

    python benchmarks/rankings.py [--model builtin:smollm2-135m-instruct] [--rows 24] [--rounds 3]

One process holds the model as training does on CPU (fp32, sdpa, LoRA r16 on every linear layer, fused). The rows
are synthetic: a prompt of 20-40 words and 4 completions of 10-30 words, scored 4, 3, 2, 1. Each way collates the
same rows as training would, 4 rows a batch, packed with the prompt shared:

- ``binarized``: ``data.pair_rule=best_vs_worst``, one pair a row (what users do today, dropping half the data);
- ``all pairs, a segment each``: ``all_pairs``, the 6 pairs of a row each its own segment (the prompt 6 times, each
  completion 3 times);
- ``all pairs, one segment a row``: the same 6 pairs with the row's pairs merged into one segment (the prompt once,
  each completion once), as the packed collator does for pairs of one group in a micro-batch;
- ``plackett_luce``: ``data.responses=ranking``, one ranking of 4 a row (the prompt once, each completion once).

Each round runs every way's batches once (forward, the loss, backward), the order rotated every round so a slow patch
of a shared machine hits each. Printed: tokens through the model per row (the batches' non-padding positions over
the rows), rows a second and pairs a second (the ordered pairs a row teaches: 1 binarized, 6 otherwise: all pairs,
or the ranking of 4), each the median of the rounds.
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

from benchmarks.lora_model import load_lora_model  # noqa: E402
from dpo_dist.data.packing import PAD_SEGMENT, PackedPairCollator  # noqa: E402
from dpo_dist.train.logprobs import group_logps, pair_logps  # noqa: E402
from dpo_dist.train.loss import preference_loss, ranking_loss  # noqa: E402

WORDS = ("the movie was a film of great music and acting from start to finish with bread flour water salt in the "
         "capital of France which is Paris and its river").split()
K = 4


def rows(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows: prompt ids and ``K`` completions' ids, best first (scores K..1), each ending in EOS."""
    rng = random.Random(seed)
    eos = [tokenizer.eos_token_id]
    out = []
    for _ in range(n):
        prompt = tokenizer(" ".join(rng.choices(WORDS, k=rng.randint(20, 40))), add_special_tokens=False)["input_ids"]
        completions = [tokenizer(" " + " ".join(rng.choices(WORDS, k=rng.randint(10, 30))),
                                 add_special_tokens=False)["input_ids"] + eos for _ in range(K)]
        out.append({"prompt": prompt, "completions": completions})
    return out


def pair_examples(batch_rows: list[dict], rule: str) -> list[dict]:
    """The pairs of each row (best first, so i < j is i chosen over j), each carrying its row as its group."""
    examples = []
    for group, row in enumerate(batch_rows):
        ordered = [(0, K - 1)] if rule == "best_vs_worst" else [(i, j) for i in range(K) for j in range(i + 1, K)]
        examples += [{"prompt_input_ids": row["prompt"], "chosen_input_ids": row["completions"][i],
                      "rejected_input_ids": row["completions"][j], "group": group} for i, j in ordered]
    return examples


def group_examples(batch_rows: list[dict]) -> list[dict]:
    return [{"prompt_input_ids": row["prompt"], "responses_input_ids": row["completions"]} for row in batch_rows]


def pairs_step(model, batch) -> None:
    out = pair_logps(model, batch)
    losses, _, _ = preference_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach(),
                                   out.rejected_logps.detach(), beta=0.1, loss_type="sigmoid")
    losses.mean().backward()


def ranking_step(model, batch) -> None:
    out = group_logps(model, batch)
    losses, _ = ranking_loss(out.logps, out.logps.detach(), out.mask, beta=0.1)
    losses.mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-rows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from dpo_dist.model.load import resolve_source

    source = resolve_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = load_lora_model(source)
    data = rows(tokenizer, args.rows)
    chunks = [data[i : i + args.batch_rows] for i in range(0, len(data), args.batch_rows)]
    collate = PackedPairCollator(tokenizer.eos_token_id, attention_layout="auto")  # as training: a row's pairs merged
    separate = PackedPairCollator(tokenizer.eos_token_id, attention_layout="auto", merge_groups=False)
    ways = {
        "binarized": (1, pairs_step, [collate(pair_examples(c, "best_vs_worst")) for c in chunks]),
        "all pairs, a segment each": (6, pairs_step, [separate(pair_examples(c, "all_pairs")) for c in chunks]),
        "all pairs, one segment a row": (6, pairs_step, [collate(pair_examples(c, "all_pairs")) for c in chunks]),
        "plackett_luce": (6, ranking_step, [collate(group_examples(c)) for c in chunks]),
    }
    seconds = {name: [] for name in ways}
    for number in range(args.rounds + 1):  # the first round warms up
        names = list(ways)[number % len(ways):] + list(ways)[:number % len(ways)]
        for name in names:
            _, step, batches = ways[name]
            started = time.perf_counter()
            for batch in batches:
                step(model, batch)
                model.zero_grad(set_to_none=True)
            if number:
                seconds[name].append(time.perf_counter() - started)
        print(f"round {number}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in ways if number), flush=True)
    print(f"\n{args.rows} rows of {K} completions, {args.batch_rows} rows a batch, {args.threads} threads, "
          f"{args.model} with LoRA r16\n")
    print("| way | tokens through the model per row | rows/s | pairs/s | vs binarized pairs/s |\n|---|---|---|---|---|")
    base = None
    for name, (pairs_per_row, _, batches) in ways.items():
        tokens = sum(int((b["segment_ids"] != PAD_SEGMENT).sum()) for b in batches) / args.rows
        rows_per_s = args.rows / statistics.median(seconds[name])
        pairs_per_s = rows_per_s * pairs_per_row
        base = base or pairs_per_s
        print(f"| {name} | {tokens:.0f} | {rows_per_s:.2f} | {pairs_per_s:.2f} | {pairs_per_s / base:.2f}x |")


if __name__ == "__main__":
    main()
