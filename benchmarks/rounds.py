"""A round of iterative DPO, measured: how fast its completions are sampled, side by side with the plain way.

    python benchmarks/rounds.py [--model builtin:smollm2-135m-instruct] [--prompts 32] [--n 4] [--max-new-tokens 32]
                                [--batch-size 16] [--repeats 3]

One process, the policy in fp32 on CPU (no LoRA: sampling reads the weights only). The prompts are the built-in
sentiment prompts (the first ``--prompts`` in a seeded order), tokenized as the sentiment stage does; each gets ``--n``
completions at temperature 1 (the rounds' default), at most ``--max-new-tokens`` tokens, KV cache on in every way:

- ``per-prompt generate``: one ``model.generate`` call per prompt (its n completions in that call), the loop one writes
  first;
- ``batched, given order``: ``model.generation.sample_responses``, batches of ``--batch-size`` prompts as they come,
  left-padded (evaluation's sampling);
- ``sample_round``: ``dpo_dist.rounds.sampling.sample_round``, the prompts sorted by length into batches of
  ``--batch-size``, left-padded, each batch written to its cache file (a fresh folder each repeat, so all is sampled).

Each repeat runs every way once, the order rotated every repeat so a slow patch of a shared machine hits each; a first
repeat warms up and is not counted. Printed: completions a second and generated tokens a second (each way draws its
own random numbers, so completions end at other lengths: tokens/s is the like-for-like figure), the medians of the
repeats, and each against the per-prompt loop.

Each section of the report is a function of the loaded :class:`Setup` that prints its table (:data:`SECTIONS`).

``--sections stages`` (no model loaded) tabulates where a finished rounds run spent its time, stage by stage, as the
run measured itself (``seconds_by_stage`` of each ``rounds.jsonl`` line): ``--run`` names its folder, by default the
one ``recipes/sentiment_rounds.yaml`` writes (``accelerate launch launch/train.py --config
recipes/sentiment_rounds.yaml``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


@dataclass
class Setup:
    """What every section measures with: the model, its tokenizer, the prompts as token ids, the options."""

    model: Any
    tokenizer: Any
    prompts: list[list[int]]
    args: argparse.Namespace


def per_prompt_generate(setup: Setup, sampling: Any) -> list[list[list[int]]]:
    """The plain loop: each prompt alone, its n completions in one ``generate`` call, cut after EOS."""
    from dpo_dist.model.generation import sampling_config

    config = sampling_config(setup.tokenizer, sampling, setup.args.n)
    eos = config.eos_token_id
    out = []
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        for ids in setup.prompts:
            generated = setup.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                             dtype=torch.long), generation_config=config)[:, len(ids):].tolist()
            out.append([row[: row.index(eos) + 1] if eos in row else row for row in generated])
    return out


def batched_given_order(setup: Setup, sampling: Any) -> list[list[list[int]]]:
    from dpo_dist.model.generation import sample_responses

    return sample_responses(setup.model, setup.tokenizer, setup.prompts, n=setup.args.n, sampling=sampling,
                            batch_size=setup.args.batch_size, device=torch.device("cpu"))


def make_sample_round(accelerator: Any) -> Callable[[Setup, Any], list[list[list[int]]]]:
    def sampled(setup: Setup, sampling: Any) -> list[list[list[int]]]:
        from dpo_dist.rounds.sampling import sample_round

        with tempfile.TemporaryDirectory() as cache:
            return sample_round(setup.model, setup.tokenizer, setup.prompts, n=setup.args.n, sampling=sampling,
                                batch_size=setup.args.batch_size, accelerator=accelerator, cache_dir=cache,
                                show_progress=False).completions

    return sampled


def sampling_throughput(setup: Setup, accelerator: Any) -> None:
    """Completions and tokens a second of the three ways, side by side (the module's docstring says how)."""
    from dpo_dist.model.generation import Sampling

    sampling = Sampling(max_new_tokens=setup.args.max_new_tokens, temperature=1.0, top_p=1.0, seed=0)
    ways: dict[str, Callable[[Setup, Any], list[list[list[int]]]]] = {
        "per-prompt generate": per_prompt_generate,
        "batched, given order": batched_given_order,
        "sample_round (sorted)": make_sample_round(accelerator),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    tokens: dict[str, list[int]] = {name: [] for name in ways}
    for number in range(setup.args.repeats + 1):  # the first repeat warms up
        names = list(ways)[number % len(ways):] + list(ways)[:number % len(ways)]
        for name in names:
            started = time.perf_counter()
            completions = ways[name](setup, sampling)
            took = time.perf_counter() - started
            if number:
                seconds[name].append(took)
                tokens[name].append(sum(len(ids) for c in completions for ids in c))
        if number:
            print(f"repeat {number}: " + ", ".join(f"{n} {seconds[n][-1]:.1f} s" for n in ways), flush=True)
    count = len(setup.prompts) * setup.args.n
    lengths = sorted(len(p) for p in setup.prompts)
    print(f"\n## Sampling throughput\n\n{len(setup.prompts)} prompts ({lengths[0]}-{lengths[-1]} tokens) x {setup.args.n} "
          f"completions, at most {setup.args.max_new_tokens} new tokens, temperature 1, batches of "
          f"{setup.args.batch_size} prompts, {torch.get_num_threads()} threads, {setup.args.model} fp32; medians of "
          f"{setup.args.repeats} repeats\n")
    print("| way | s | completions/s | tokens/s | tokens/completion | vs per-prompt (completions/s) | vs per-prompt "
          "(tokens/s) |\n|---|---|---|---|---|---|---|")
    base = None
    for name in ways:
        s = statistics.median(seconds[name])
        rate = count / s
        token_rate = statistics.median(t / x for t, x in zip(tokens[name], seconds[name]))
        base = base or (rate, token_rate)
        print(f"| {name} | {s:.1f} | {rate:.2f} | {token_rate:.1f} | {statistics.median(tokens[name]) / count:.1f} | "
              f"{rate / base[0]:.2f}x | {token_rate / base[1]:.2f}x |")


SECTIONS: dict[str, Callable[[Setup, Any], None]] = {"sampling": sampling_throughput}
STAGES = ("sampling", "judging", "pairing", "reference", "training", "eval")


def stage_times(run: str) -> None:
    """Seconds per stage of each round of the finished run in ``run``, and each stage's share of the rounds' time."""
    import json

    path = os.path.join(run, "rounds.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no rounds here; run accelerate launch launch/train.py --config "
                         "recipes/sentiment_rounds.yaml first (or pass --run)")
    with open(path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    print(f"\n## Time per stage of a round\n\n{run}: {len(lines)} rounds, each stage as the run measured it (s)\n")
    print("| round | " + " | ".join(STAGES) + " | all | steps | pairs |\n|" + "---|" * (len(STAGES) + 4))
    totals = {stage: 0.0 for stage in STAGES}
    for line in lines:
        spent = line["seconds_by_stage"]
        for stage in STAGES:
            totals[stage] += spent.get(stage, 0.0)
        print(f"| {line['round']} | " + " | ".join(f"{spent.get(stage, 0.0):.1f}" for stage in STAGES)
              + f" | {line['seconds']:.1f} | {line['steps']} | {line['pairs']} |")
    whole = sum(totals.values())
    print("| share | " + " | ".join(f"{totals[stage] / whole:.0%}" for stage in STAGES) + " | 100% | | |")


def sentiment_prompt_ids(tokenizer: Any, count: int, seed: int = 0) -> list[list[int]]:
    """The first ``count`` built-in sentiment prompts in a seeded order, as token ids (as the sentiment stage
    tokenizes them: plain text, the tokenizer's own special tokens)."""
    from dpo_dist.data.sentiment import prompts

    texts = prompts()
    random.Random(seed).shuffle(texts)
    return [tokenizer(text)["input_ids"] for text in texts[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="a model folder or built-in name; 'tiny' builds a 2-layer llama (no download)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--sections", nargs="+", default=["stages", *SECTIONS], choices=["stages", *SECTIONS])
    parser.add_argument("--run", default="outputs/sentiment_rounds", help="the stages section's finished rounds run")
    args = parser.parse_args()
    if "stages" in args.sections:
        stage_times(args.run)
        args.sections = [name for name in args.sections if name != "stages"]
        if not args.sections:
            return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.distributed import build_accelerator

    if args.model == "tiny":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tiny import make_llama, make_tokenizer

        tokenizer = make_tokenizer("nobos")
        model = make_llama(len(tokenizer))
    else:
        from dpo_dist.model.load import resolve_source

        source = resolve_source(args.model)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").eval()
    accelerator = build_accelerator()
    setup = Setup(model, tokenizer, sentiment_prompt_ids(tokenizer, args.prompts), args)
    for name in args.sections:
        SECTIONS[name](setup, accelerator)


if __name__ == "__main__":
    main()
