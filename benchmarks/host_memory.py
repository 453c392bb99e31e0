"""train.keep_freed_memory against glibc's malloc defaults: page faults and time of a CPU forward and backward.

    python benchmarks/host_memory.py --model DIR --pairs outputs/bench-vs-trl/pairs_tokenized.jsonl [--rounds 12]

Two processes hold the same model (LoRA r16 on all linear layers, fused as in training, fp32): one with
``dpo_dist.train.host_memory.keep_freed_memory()`` applied at start, one with glibc's defaults. Each warms up on the
pairs' batches of 4 (the token ids ``benchmarks/vs_trl.py`` writes; packed as training packs them), then the two
take turns, one forward and backward over all the batches per turn, the order swapped every round, so a slow patch
of a shared machine hits both. Printed per round: each side's seconds and the ratio; then the medians, CPU seconds
and page faults per turn. Separate training runs (``vs_trl.py --variants default,glibc-malloc``) move by 10-30% from
run to run on a shared machine, more than this lever; taking turns is the steadier comparison.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.lora_model import add_arguments  # noqa: E402  (imports no torch: the child sets malloc first)

SIDES = ("glibc", "keep")


def child(side: str, model_dir: str, pairs_file: str, threads: int, batch: int = 4) -> None:
    """Hold the model; on each line of stdin run one turn and print 'seconds cpu_seconds faults'."""
    if side == "keep":
        from dpo_dist.train.host_memory import keep_freed_memory

        if keep_freed_memory() is None:
            raise SystemExit("this C library is not glibc: nothing to compare")
    import torch

    from benchmarks.lora_model import forward_backward, load_lora_model, token_pairs
    from dpo_dist.data.packing import PackedPairCollator

    torch.set_num_threads(threads)
    model, pairs = load_lora_model(model_dir), token_pairs(pairs_file)
    collate = PackedPairCollator(0, attention_layout="auto")
    batches = [collate(pairs[i : i + batch]) for i in range(0, len(pairs) - batch + 1, batch)]

    def turn():
        for collated in batches:
            forward_backward(model, collated)

    for _ in range(2):  # warm: the heap settles
        turn()
    print("ready", flush=True)
    for _ in sys.stdin:
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        turn()
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(f"{seconds:.4f} {cpu:.4f} {after.ru_minflt - before.ru_minflt}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, rounds=12)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.pairs, args.threads)
    procs = {}
    for side in SIDES:  # one at a time until ready, so loading does not overlap
        procs[side] = subprocess.Popen(
            [sys.executable, __file__, "--child", side, "--model", args.model, "--pairs", args.pairs,
             "--threads", str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if procs[side].stdout.readline().strip() != "ready":
            raise SystemExit(f"the {side} process failed to start")
    results = {side: [] for side in SIDES}
    print("| round | glibc defaults s | kept s | ratio |\n|---|---|---|---|")
    for number in range(args.rounds):
        for side in SIDES if number % 2 == 0 else SIDES[::-1]:
            procs[side].stdin.write("go\n")
            procs[side].stdin.flush()
            results[side].append([float(x) for x in procs[side].stdout.readline().split()])
        glibc, keep = results["glibc"][-1][0], results["keep"][-1][0]
        print(f"| {number + 1} | {glibc:.3f} | {keep:.3f} | {glibc / keep:.3f} |", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    ratios = [g[0] / k[0] for g, k in zip(results["glibc"], results["keep"])]
    for side, name in zip(SIDES, ("glibc defaults", "freed memory kept")):
        seconds, cpu, faults = (statistics.median(r[i] for r in results[side]) for i in range(3))
        print(f"{name}: {seconds:.3f} s a turn (median), {cpu:.3f} CPU s, {faults:.0f} page faults")
    print(f"glibc defaults / kept: median {statistics.median(ratios):.3f}; kept faster in "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)} rounds")


if __name__ == "__main__":
    main()
