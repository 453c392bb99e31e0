"""Evaluate a trained run against its base model.

    python launch/evaluate.py outputs/default                                   # the default run: VADER judge
    python launch/evaluate.py outputs/mine --judge reward_model:path/to/reward-model
    python launch/evaluate.py outputs/mine --judge llm:path/to/judge-lm --samples_per_prompt 2
    python launch/evaluate.py outputs/mine --judge python:my_judges:score   # my_judges.score(prompts, responses)

Held-out preference metrics (reward accuracy, margin, loss), the win rate of sampled responses against the base's
judged pairwise, and the KL divergence from the base. Writes ``results.json``, ``results.md``, ``samples.jsonl`` and
(score judges) ``reward_vs_kl.png`` into ``<run>/eval`` or ``--out``, and prints the markdown.
"""

from __future__ import annotations

import argparse
import os
import sys

import _checkout  # noqa: F401  this checkout's root on the import path, before any dpo_dist import

from dpo_dist.config import JUDGE_KINDS  # no torch either
from dpo_dist.eval.options import EvalOptions  # no torch: --help answers at once
from dpo_dist.model.generation import Sampling


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = EvalOptions()  # the options' defaults are the dataclass's
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a training run's output folder (config.yaml and model/)")
    parser.add_argument("--judge", default=defaults.judge,
                        help=f"{' | '.join(JUDGE_KINDS)} | none (default: sentiment for the built-in "
                             "sentiment task, none otherwise)")
    parser.add_argument("--judge_instruction", default=defaults.judge_instruction,
                        help="the LLM judge's instruction (what 'better' means)")
    parser.add_argument("--samples_per_prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--num_prompts", type=int, default=defaults.num_prompts,
                        help="use the first N held-out prompts (default all)")
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens,
                        help="default: the sentiment task's length (20) for it, else 128")
    parser.add_argument("--temperature", type=float, default=defaults.sampling.temperature)
    parser.add_argument("--top_p", type=float, default=defaults.sampling.top_p)
    parser.add_argument("--top_k", type=int, default=defaults.sampling.top_k)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--base", default=defaults.base, help="the base model (default: the run's model.name_or_path)")
    parser.add_argument("--eval_source", default=defaults.eval_source,
                        help="held-out pairs to use instead of the run's eval split")
    parser.add_argument("--prompts", default=defaults.prompts,
                        help="a JSON-lines file of {\"prompt\": ...} to sample from instead of the held-out prompts "
                             "(for a run without an eval split: no pair metrics then)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/eval)")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    if args.samples_per_prompt < 1 or args.batch_size < 1 or (args.num_prompts is not None and args.num_prompts < 1):
        parser.error("--samples_per_prompt, --batch_size and --num_prompts must be positive")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--temperature must be > 0, --top_p in (0, 1], --top_k >= 0")
    return args


def quiet(run: str, whole_process: bool) -> None:
    """Warnings and errors only, each warning once (:func:`dpo_dist.distributed.filter_warnings`). No progress bars
    for loading weights or mapping a few dozen rows: the evaluation's own stages show theirs (:mod:`dpo_dist.progress`).
    ``whole_process`` (``python launch/evaluate.py``): bitsandbytes is kept out unless the run trained on a 4/8-bit
    base, DeepSpeed always."""
    import logging

    from dpo_dist.distributed import filter_warnings, load_only_what_is_used
    from dpo_dist.model.trained import run_config

    if whole_process:
        cfg = run_config(run) if os.path.isdir(run) else None  # the base is loaded as the run loaded it
        load_only_what_is_used(bitsandbytes=cfg is not None and cfg.model.quantization != "none", deepspeed=False)
    filter_warnings()
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet(args.run, whole_process)  # the arguments are parsed first: --help and a bad option answer without loading torch
    from dpo_dist.eval.against_base import evaluate_run, output_dir_for
    from dpo_dist.eval.report import markdown, write_report

    options = EvalOptions(
        judge=args.judge, samples_per_prompt=args.samples_per_prompt, num_prompts=args.num_prompts,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, base=args.base,
        eval_source=args.eval_source, prompts=args.prompts, seed=args.seed,
        judge_instruction=args.judge_instruction or EvalOptions.judge_instruction,  # an empty one: the default
    )
    try:
        results = evaluate_run(args.run, options)
    except (ValueError, OSError) as error:  # DataError is a ValueError: a bad eval file, a missing model, no eval split
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(markdown(results))
    for path in write_report(results, args.out or output_dir_for(args.run), plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(whole_process=True))
