"""dpo-dist against TRL's DPOTrainer, side by side, in one invocation.

    python benchmarks/vs_trl.py                          # HH-RLHF pairs from ../shared/data/hh-rlhf if present
    python benchmarks/vs_trl.py --steps 8 --rounds 3 --variants default,padded

Both train SmolLM2-135M-Instruct with LoRA r=16 (alpha 32) on all linear layers, fp32, on the same pre-tokenized
pairs in the same order (dpo-dist's seeded order), the same batch, max_length, learning rate and initial LoRA
weights, each in its own process, alternating (dpo-dist variants, then TRL, repeated ``--rounds`` times), so a slow
patch of a shared machine hits every system. TRL is installed only in its own virtual environment
(``benchmarks/.trl-venv``, made on first use with ``--system-site-packages`` plus ``trl``), never in the project's.

Reported per system: non-padding tokens per second (the pairs' tokens as two sequences each, prompt counted twice,
the same count for every system), seconds per step (median of the steps after ``--warmup``, over all rounds), the
peak resident memory of the training phase (VmHWM reset before the first step) and of the whole process, the ratio of
each to TRL's, the first steps' losses and their largest difference from TRL's, and utilization: the model FLOPs
each system's step needs (see ``step_flops``) per second over the fp32 matmul peak measured here first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base-test.jsonl.gz")
TRL_VERSION = "1.16.0"
VARIANTS = {  # dpo-dist configurations (section.key overrides), each one lever away from the default
    "default": {},  # reference precomputed, packing and prompt sharing on (train.packing=auto)
    "no-sharing": {"train.share_prompt": False},  # packed, but prompt|chosen and prompt|rejected as two segments
    "padded": {"train.packing": "off"},  # padded chosen and rejected rows, full logits then chunked log-softmax
    "online-ref": {"reference.mode": "online"},  # the reference forward in every step instead of precomputed
    "dense-attention": {"train.attention_layout": "dense"},  # packed rows under one mask each, never segmented
    "glibc-malloc": {"train.keep_freed_memory": False},  # malloc's defaults: freed memory handed back, pages re-faulted
}


def trl_python(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"making TRL's own environment in {venv} (trl=={TRL_VERSION})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    return python


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """The best fp32 matmul rate of a few tries: the machine's practical peak, the denominator of utilization."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def step_flops(config, prompt: int, chosen: int, rejected: int, *, shared_prompt: bool,
               reference_forward: bool = False) -> float:
    """Model FLOPs of one pair in a LoRA step: forward (2 per weight per token) and the backward's input gradients
    (2 more; the frozen base needs no weight gradients) through the transformer's linear layers for every token, the
    LM head for the scored (response) tokens only, and causal attention (QK^T and AV, forward and backward). LoRA's
    own matmuls (r=16) are left out (under 1%). ``shared_prompt``: the prompt is computed once for both responses;
    ``reference_forward``: a reference forward (no backward) in the step too."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o; k, v; gate, up, down
    head = h * config.vocab_size

    def forward(length: int, scored: int) -> float:
        attention = layers * 2 * 2 * h * length * (length + 1) / 2  # QK^T and AV over the causal half
        return 2 * (per_token * length + head * scored) + attention

    if shared_prompt:
        once = forward(prompt + chosen, chosen) + forward(prompt + rejected, rejected) - forward(prompt, 0)
    else:
        once = forward(prompt + chosen, chosen) + forward(prompt + rejected, rejected)
    return once * (3 if reference_forward else 2)  # forward + input-gradient backward (+ the reference's forward)


def positions_per_step(lengths: list[list[tuple[int, int, int]]], batch: int, seed: int) -> dict[str, float]:
    """Token positions the forward computes per step (padding included) under each way of batching the same pairs,
    and the non-padding tokens: each lever's saving on its own, from the data alone.

    - padded: chosen and rejected rows padded to the batch's longest (TRL; dpo-dist with train.packing=off);
    - length-grouped: the same, with the pairs sorted by length within windows of 32 batches before batching (the
      batches then hold other pairs, so the loss trajectory is no longer the same);
    - packed: prompt|chosen|rejected segments, prompt once, packed into rows (``dpo_dist.data.packing.choose_rows``)
      for a dense mask; the segmented layout puts them in one row with no padding (``non_padding_shared``).
    """
    import random

    from dpo_dist.data.packing import choose_rows

    def padded(step):
        return 2 * len(step) * max(p + max(c, r) for p, c, r in step)

    def packed(step):
        segments = [p + c + r for p, c, r in step]
        rows = choose_rows(segments)
        return len(rows) * max(sum(segments[i] for i in row) for row in rows)

    pairs = [pair for step in lengths for pair in step]
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    window = 32 * batch
    grouped = []
    for start in range(0, len(shuffled), window):
        grouped += sorted(shuffled[start : start + window], key=lambda t: t[0] + max(t[1], t[2]))
    grouped_steps = [grouped[i : i + batch] for i in range(0, len(grouped), batch)]
    steps = len(lengths)
    return {
        "non_padding_unshared": sum(2 * p + c + r for p, c, r in pairs) / steps,
        "padded": sum(map(padded, lengths)) / steps,
        "length_grouped": sum(map(padded, grouped_steps)) / len(grouped_steps),
        "packed_shared": sum(map(packed, lengths)) / steps,
        "non_padding_shared": sum(p + c + r for p, c, r in pairs) / steps,
    }


def prepare(args, work: str) -> dict:
    """Pairs (text for dpo-dist, token ids in step order for TRL), the initial adapter, and their token counts."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from dpo_dist.model.builtin import smollm2_folder
    from dpo_dist.config import Config
    from dpo_dist.data.load import load_pairs
    from dpo_dist.model.load import load_tokenizer
    from dpo_dist.data.tokenization import Truncation, tokenize_pairs
    from dpo_dist.data.order import DataOrder

    model_dir = smollm2_folder()
    tokenizer = load_tokenizer(model_dir, Config())
    n = args.steps * args.batch
    if os.path.exists(HH) and not args.builtin:
        source = HH
        pairs, _ = load_pairs(HH, data_format="hh", on_bad_row="skip")
    else:
        from dpo_dist.data.sentiment import prompts

        source = "built-in (sentiment prompts with fixed responses)"
        import datasets

        pairs = datasets.Dataset.from_list([{"prompt": p, "chosen": " a wonderful film, full of heart.",
                                             "rejected": " a dull film, and far too long."} for p in prompts()])
    pairs = pairs.shuffle(seed=args.seed).select(range(n))
    text_path = os.path.join(work, "pairs.jsonl")
    with open(text_path, "w") as handle:
        for row in pairs:
            handle.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, Truncation(args.max_length, args.max_prompt_length))
    assert dropped == 0 and len(tokenized) == n
    order = DataOrder(n, per_device=args.batch, accumulation=1, processes=1, seed=args.seed)
    steps = [order.micro_batches(s, 0)[0] for s in range(args.steps)]
    lengths = []
    with open(os.path.join(work, "pairs_tokenized.jsonl"), "w") as handle:
        for indices in steps:
            step = []
            for i in indices:
                row = tokenized[i]
                ids = {k: row[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected")}
                handle.write(json.dumps({f"{k}_ids": v for k, v in ids.items()}) + "\n")
                step.append(tuple(len(v) for v in ids.values()))
            lengths.append(step)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    save_file(get_peft_model_state_dict(peft_model), os.path.join(work, "init_adapter.safetensors"))
    return {"model": model_dir, "config": model.config, "source": source, "lengths": lengths}


def run_worker(python: str, worker: str, spec: dict, work: str, label: str) -> dict:
    spec_path, result_path = os.path.join(work, f"spec-{label}.json"), os.path.join(work, f"result-{label}.json")
    json.dump(spec, open(spec_path, "w"))
    started = time.perf_counter()
    done = subprocess.run([python, os.path.join(HERE, worker), spec_path, result_path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.load(open(result_path))
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"dpo-dist variants: {', '.join(VARIANTS)}")
    parser.add_argument("--builtin", action="store_true", help="the built-in pairs even when HH-RLHF is present")
    parser.add_argument("--trl_venv", default=os.path.join(HERE, ".trl-venv"))
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "bench-vs-trl"))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: {list(VARIANTS)}")

    os.makedirs(args.work, exist_ok=True)
    python = trl_python(args.trl_venv)
    peak = matmul_peak_gflops(args.threads)
    data = prepare(args, args.work)
    spec = {"model": data["model"], "work": args.work, "batch": args.batch, "steps": args.steps, "lr": args.lr,
            "beta": args.beta, "seed": args.seed, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "threads": args.threads,
            "text_pairs": os.path.join(args.work, "pairs.jsonl"), "pairs": os.path.join(args.work, "pairs_tokenized.jsonl"),
            "init_adapter": os.path.join(args.work, "init_adapter.safetensors")}
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for label in variants + ["trl"]:
            print(f"round {round_ + 1}/{args.rounds}: {label}", flush=True)
            if label == "trl":
                result = run_worker(python, "trl_worker.py", spec, args.work, label)
            else:
                result = run_worker(sys.executable, "dpo_dist_worker.py",
                                    {**spec, "label": label, "overrides": VARIANTS[label]}, args.work, label)
            runs.setdefault(label, []).append(result)

    tokens = [sum(2 * p + c + r for p, c, r in step) for step in data["lengths"]]
    timed = range(args.warmup, args.steps)
    summary = {}
    for label, results in runs.items():
        overrides = VARIANTS.get(label, {})
        shared = (label != "trl" and overrides.get("train.packing", "auto") != "off"
                  and overrides.get("train.share_prompt", True))
        online = overrides.get("reference.mode") == "online"
        flops = [sum(step_flops(data["config"], p, c, r, shared_prompt=shared, reference_forward=online)
                     for p, c, r in step)
                 for step in data["lengths"]]
        step_times = [res["step_times"][s] for res in results for s in timed]
        rates = [tokens[s] / res["step_times"][s] for res in results for s in timed]
        utilization = [flops[s] / res["step_times"][s] / 1e9 / peak for res in results for s in timed]
        summary[label] = {
            "tokens_per_s": statistics.median(rates), "s_per_step": statistics.median(step_times),
            "train_peak_rss_gb": max(res["train_peak_rss_gb"] for res in results),
            "process_peak_rss_gb": max(res["process_peak_rss_gb"] for res in results),
            "utilization": statistics.median(utilization), "losses": results[0]["losses"][: args.steps],
            "shared_prompt": bool(shared),
        }
    trl = summary["trl"]
    print(f"\nmatmul peak (fp32, {args.threads} threads): {peak:.1f} GFLOP/s; pairs: {data['source']}; "
          f"{args.steps} steps of {args.batch} pairs, {sum(tokens) / args.steps:.0f} non-padding tokens per step; "
          f"median over steps {args.warmup + 1}-{args.steps} of {args.rounds} rounds\n")
    print("| system | tokens/s | vs TRL | s/step | train peak RSS (GiB) | vs TRL | process peak RSS (GiB) | "
          "utilization | max loss diff vs TRL (steps 1-3) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        diff = max(abs(a - b) for a, b in zip(s["losses"][:3], trl["losses"][:3]))
        s["max_loss_diff_first3"] = diff
        print(f"| {label} | {s['tokens_per_s']:.0f} | {s['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
              f"{s['s_per_step']:.2f} | {s['train_peak_rss_gb']:.2f} | "
              f"{s['train_peak_rss_gb'] / trl['train_peak_rss_gb']:.2f}x | {s['process_peak_rss_gb']:.2f} | "
              f"{100 * s['utilization']:.0f}% | {diff:.2e} |")
    positions = positions_per_step(data["lengths"], args.batch, args.seed)
    print(f"\ntoken positions computed per step (padding included): padded {positions['padded']:.0f}, "
          f"length-grouped padded {positions['length_grouped']:.0f}, packed with the prompt shared "
          f"{positions['packed_shared']:.0f} in rows for a dense mask, {positions['non_padding_shared']:.0f} in one row "
          f"segmented; non-padding tokens: {positions['non_padding_unshared']:.0f} as two "
          f"sequences per pair, {positions['non_padding_shared']:.0f} with the prompt once")
    print("\nlosses (first steps):")
    for label, s in summary.items():
        print(f"  {label:>12}: " + " ".join(f"{x:.5f}" for x in s["losses"]))
    if args.json:
        json.dump({"date": datetime.date.today().isoformat(), "args": vars(args), "matmul_peak_gflops": peak,
                   "positions_per_step": positions, "summary": summary, "runs": runs}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
