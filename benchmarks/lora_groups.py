"""LoRA layers of one input computed as groups against one by one: a CPU forward and backward of the whole model.

    python benchmarks/lora_groups.py --model DIR --pairs outputs/bench-vs-trl/pairs_tokenized.jsonl [--rounds 8]

One process holds the model twice with the same weights (SmolLM2-135M-Instruct for the figures; LoRA r16 on all
linear layers, fused as in training, fp32): once with q/k/v and gate/up grouped
(``dpo_dist.model.lora_linear.LoraGroupFunction``, the default), once one layer at a time. Each round runs one
forward and backward over all of the pairs' batches of 4 (packed as training packs them) on each, the order swapped
every round, so a slow patch of a shared machine hits both. Printed: each round's seconds and ratio, the medians, and
the largest difference between the two sides' summed log-probs (they compute the same numbers).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.lora_model import add_arguments, forward_backward, load_lora_model, token_pairs  # noqa: E402
from dpo_dist.data.packing import PackedPairCollator  # noqa: E402
from dpo_dist.model.lora_linear import group_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, rounds=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    single = load_lora_model(args.model, group=False)
    grouped = copy.deepcopy(single)
    print(f"{group_lora(grouped)} groups; {args.threads} threads")
    pairs = token_pairs(args.pairs)
    collate = PackedPairCollator(0, attention_layout="auto")
    batches = [collate(pairs[i : i + args.batch]) for i in range(0, len(pairs) - args.batch + 1, args.batch)]
    sides = {"one by one": single, "grouped": grouped}
    seconds = {name: [] for name in sides}
    values = {name: [] for name in sides}

    def turn(name):
        started = time.perf_counter()
        values[name].append([forward_backward(sides[name], collated) for collated in batches])
        return time.perf_counter() - started

    for name in sides:  # warm
        turn(name)
    print("| round | one by one s | grouped s | ratio |\n|---|---|---|---|")
    for number in range(args.rounds):
        for name in list(sides) if number % 2 == 0 else list(sides)[::-1]:
            seconds[name].append(turn(name))
        single_s, grouped_s = seconds["one by one"][-1], seconds["grouped"][-1]
        print(f"| {number + 1} | {single_s:.3f} | {grouped_s:.3f} | {single_s / grouped_s:.3f} |", flush=True)
    ratios = [s / g for s, g in zip(seconds["one by one"], seconds["grouped"])]
    difference = max(abs(a - b) for x, y in zip(values["one by one"], values["grouped"]) for a, b in zip(x, y))
    print(f"one by one {statistics.median(seconds['one by one']):.3f} s a round, grouped "
          f"{statistics.median(seconds['grouped']):.3f} s (medians); one by one / grouped: median "
          f"{statistics.median(ratios):.3f}, grouped faster in {sum(r > 1 for r in ratios)} of {len(ratios)} rounds; "
          f"largest difference of the summed log-probs {difference:.2e}")


if __name__ == "__main__":
    main()
