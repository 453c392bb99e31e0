"""Evaluate a trained run against its base: held-out preference metrics, generation win-rate, KL divergence.

    results = evaluate_run("outputs/default", EvalOptions())      # what launch/evaluate.py runs

1. **Preference metrics** on the run's eval split (the pairs it never trained on): the implicit DPO reward
   ``beta * (log pi - log pi_ref)`` of each response, with the base as the reference; reward accuracy (through the
   local ``evaluate`` module ``accuracy``), mean margin and loss, the same numbers the trainer's ``eval/*`` reports.
2. **Win rate**: ``samples_per_prompt`` responses sampled from the trained model and from the base for each
   held-out prompt, with the same random numbers for both, the i-th of one against the i-th of the other, judged
   pairwise (:mod:`dpo_dist.eval.judges`); wins, losses, ties and the win rate with a prompt-level bootstrap interval
   (the local ``evaluate`` module ``win_rate``), and each side's mean response length.
3. **KL divergence** of the trained model from the base, ``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log
   pi_ref(y|x)]`` per response (summed over its tokens), estimated from responses sampled from the trained model at
   temperature 1 with no top-p/top-k (separate samples are drawn for it when the win-rate sampling is not that).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch

from dpo_dist.config import SENTIMENT, STATS, Config
from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.data.load import data_source, load_configured_pairs
from dpo_dist.data.prompts import load_prompts
from dpo_dist.data.sentiment import dataset_paths, ensure_sentiment_data, prompts_path
from dpo_dist.data.tokenization import Truncation, tokenize_pairs, tokenize_prompt
from dpo_dist.eval.judges import ScoreJudge, build_judge
from dpo_dist.eval.metrics import load_metric
from dpo_dist.eval.options import EvalOptions
from dpo_dist.eval.report import FOLDER
from dpo_dist.eval.scoring import response_logps
from dpo_dist.model.builtin import cache_root
from dpo_dist.model.generation import Sampling, sample_responses
from dpo_dist.model.load import resolve_dtype, resolve_source
from dpo_dist.model.trained import load_base_model, load_trained, model_folder, run_config
from dpo_dist.progress import progress
from dpo_dist.train.inputs import keyed_identity
from dpo_dist.train.reference import as_reference


def mean_and_stderr(values: list[float], groups: list[int]) -> tuple[float, float]:
    """The mean, and its standard error over groups (responses to one prompt are not independent: the error is
    that of the per-prompt means). Shape: values, groups (N,)."""
    by_group: dict[int, list[float]] = {}
    for value, group in zip(values, groups):
        by_group.setdefault(group, []).append(value)
    means = [sum(v) / len(v) for v in by_group.values()]
    mean = sum(values) / len(values)
    if len(means) < 2:
        return mean, float("nan")
    centre = sum(means) / len(means)
    variance = sum((m - centre) ** 2 for m in means) / (len(means) - 1)
    return mean, math.sqrt(variance / len(means))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional: a tie counts
    half). Unlike ``p +- z * stderr`` it stays within [0, 1] and is not empty at 0 of n or n of n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor, groups: list[int]) -> dict[str, float]:
    """Monte Carlo ``KL(pi || pi_ref)`` per response from responses sampled from ``pi``: the mean log-ratio.

    Shape: policy_logps, ref_logps (N,) summed log-probs of the same N sampled responses.
    """
    kl, stderr = mean_and_stderr((policy_logps.double() - ref_logps.double()).tolist(), groups)
    return {"kl": kl, "kl_stderr": stderr}


def held_out_pairs(cfg: Config, model: Any, tokenizer: Any, device: torch.device,
                   required: bool = True) -> tuple[Any, dict[int, Any], dict | None]:
    """The run's eval pairs, tokenized as in training, each one's raw prompt by row, and the model identity the
    built-in set is keyed by. No eval split: an error when ``required``, else ``(None, {}, identity)``. Loaded in
    this one process, as the data stage loads them (what each source gave is printed, as training prints it)."""
    identity = keyed_identity(cfg, resolve_source(cfg.model.name_or_path),
                              str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."))
    if cfg.rounds.count > 1:  # iterative rounds: the pairs were the rounds' own; their held-out prompts remain
        if required:
            raise ValueError("an iterative-rounds run has no held-out pairs (its pairs were sampled each round): its "
                             "evaluation samples its held-out prompts (pass no --eval_source)")
        return None, {}, identity
    paths = None
    if data_source(cfg) == SENTIMENT:
        with as_reference(model) as base:  # the sentiment set, if not cached, is sampled from the base
            paths = ensure_sentiment_data(lambda: base, tokenizer, cfg.data.sentiment, identity, device, cache_root())
    _, eval_pairs, reports = load_configured_pairs(cfg, tokenizer, sentiment=paths)
    for report in reports:
        print(report.summary(), flush=True)
    if eval_pairs is None or len(eval_pairs) == 0:
        if not required:
            return None, {}, identity
        raise ValueError("the run has no eval split (data.eval_ratio=0 and no data.eval_source): pass --eval_source "
                         "FILE with held-out pairs, or --prompts FILE with held-out prompts (no pair metrics then)")
    tokenized, _ = tokenize_pairs(eval_pairs, tokenizer, Truncation(cfg.data.max_length, cfg.data.max_prompt_length))
    prompts = {row: prompt for row, prompt in zip(eval_pairs["row"], eval_pairs["prompt"])}
    return tokenized, prompts, identity


def read_prompts(path: str) -> list[Any]:
    """``{"prompt": text or messages}`` a line; a DataError naming the file and line otherwise."""
    from dpo_dist.data.load import DataError

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such prompts file")
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: not JSON ({error})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)) or not row["prompt"]:
                raise DataError(f"{path}: line {number}: needs a non-empty \"prompt\" (text or a list of messages)")
            out.append(row["prompt"])
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def generation_prompts(cfg: Config, opts: "EvalOptions", tokenized: Any, raw: dict[int, Any], tokenizer: Any,
                       identity: dict | None) -> tuple[list[list[int]], list[str], str]:
    """The prompts sampled from (token ids as in training, and judge text) and a line saying where they came from:
    ``--prompts``; for the built-in set every held-out prompt its data build recorded (also those whose
    completions made no pair); else each prompt of the eval pairs once."""
    if opts.prompts is None and cfg.rounds.count > 1:
        held_out = load_prompts(cfg).held_out[: opts.num_prompts]
        truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
        tokens = [tokenize_prompt(prompt, tokenizer, truncation) for prompt in held_out]
        kept = [(ids, prompt_text(prompt)) for ids, prompt in zip(tokens, held_out) if ids is not None]
        return ([ids for ids, _ in kept], [text for _, text in kept],
                f"the {len(kept)} held-out prompts of the run's rounds (each round's evaluation sampled them too)")
    if opts.prompts is None and not cfg.data.uses_sentiment():
        ids, texts = unique_prompts(tokenized, raw, opts.num_prompts)
        return ids, texts, f"each prompt of the run's {len(tokenized)} eval pairs once"
    if opts.prompts is not None:
        path, said = opts.prompts, f"--prompts {opts.prompts}"
    else:
        path = prompts_path(dataset_paths(cfg.data.sentiment, identity, cache_root()))
        said = f"every held-out prompt of the built-in sentiment set, as its data build recorded them ({path})"
    truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
    ids, texts = [], []
    for prompt in read_prompts(path)[: opts.num_prompts]:
        tokens = tokenize_prompt(prompt, tokenizer, truncation)
        if tokens is None:
            raise ValueError(f"{path}: a prompt leaves no room for a response within data.max_length="
                             f"{cfg.data.max_length}: {prompt_text(prompt)[:80]!r}")
        ids.append(tokens)
        texts.append(prompt_text(prompt))
    return ids, texts, said


@torch.no_grad()
def preference_metrics(model: Any, reference: Any, tokenized: Any, cfg: Config, tokenizer: Any,
                       batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss, reward accuracy and margin of the held-out pairs, the base as reference; of rankings
    (``data.responses=ranking``) read on each one's best and worst response, with its ranking and top-1 accuracy."""
    from dpo_dist.train.metrics import reduce_stats
    from dpo_dist.train.objective import batch_losses

    cfg = dataclasses.replace(cfg, reference=dataclasses.replace(
        cfg.reference, mode="none" if cfg.reference.mode == "none" else "online"))
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    rows = []
    with progress(len(tokenized), "held-out pairs", unit="pair") as bar:
        for start in range(0, len(tokenized), batch_size):
            pairs = [tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))]
            batch = collator(pairs)
            rows.append(batch_losses(model, {k: v.to(device) for k, v in batch.items()}, cfg, reference)[1].cpu())
            bar.update(len(pairs))
    stats = torch.cat(rows)
    record = reduce_stats(stats)
    correct = stats[:, STATS.index("rewards/accuracies")].long().tolist()
    accuracy = load_metric("accuracy").compute(predictions=correct, references=[1] * len(correct))["accuracy"]
    low, high = wilson_interval(sum(correct), len(correct))
    return {"pairs": len(tokenized), "loss": record["loss"], "reward_accuracy": accuracy,
            "correct": sum(correct), "reward_accuracy_wilson": [low, high],
            "margin": record["rewards/margins"], "rewards/chosen": record["rewards/chosen"],
            "rewards/rejected": record["rewards/rejected"],
            **{k: record[k] for k in ("rewards/ranking_accuracies", "rewards/top1_accuracies") if k in record}}


def prompt_text(prompt: Any) -> str:
    """A raw prompt as a judge reads it: the text, or a conversation's messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def unique_prompts(tokenized: Any, raw: dict[int, Any], limit: int | None) -> tuple[list[list[int]], list[str]]:
    """Each held-out prompt once (a prompt may have several pairs), in order: token ids and judge text."""
    seen: dict[tuple[int, ...], str] = {}
    for ids, row in zip(tokenized["prompt_input_ids"], tokenized["row"]):
        seen.setdefault(tuple(ids), prompt_text(raw[row]))
    items = list(seen.items())[:limit]
    return [list(ids) for ids, _ in items], [text for _, text in items]


def evaluate_run(path: str, opts: EvalOptions) -> dict[str, Any]:
    """All three evaluations of the run at ``path``; returns the results (see ``eval_report`` for the files)."""
    model_folder(path)  # a clear error first when there is no model at all
    cfg = run_config(path)
    if cfg is None:
        raise FileNotFoundError(f"{path}: no config.yaml here or beside it: evaluate a training run's output folder "
                                "(it has config.yaml and model/)")
    if opts.eval_source is not None:
        cfg.data.eval_source, cfg.data.eval_split = opts.eval_source, None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(path, device=device, base=opts.base, cfg=cfg)
    model, tokenizer = trained.model, trained.tokenizer
    reference = model if trained.is_adapter else load_base_model(trained, device)
    rounds = cfg.rounds.count > 1
    tokenized, raw_prompts, identity = held_out_pairs(cfg, reference, tokenizer, device,
                                                      required=opts.prompts is None and not rounds)
    results: dict[str, Any] = {
        "model": trained.folder, "base": trained.base_source, "adapter": trained.is_adapter,
        "preference": None if tokenized is None else
        preference_metrics(model, reference, tokenized, cfg, tokenizer, opts.batch_size, device),
    }

    judge_spec = (opts.judge if opts.judge != "auto" else cfg.rounds.judge if rounds
                  else "sentiment" if cfg.data.uses_sentiment() else "none")
    max_new = opts.max_new_tokens or (cfg.rounds.max_new_tokens if rounds else cfg.data.sentiment.max_new_tokens
                                      if cfg.data.uses_sentiment() else 128)
    sampling = dataclasses.replace(opts.sampling, max_new_tokens=max_new, seed=opts.seed)
    prompt_ids, prompt_texts, source = generation_prompts(cfg, opts, tokenized, raw_prompts, tokenizer, identity)
    n = opts.samples_per_prompt
    generate = dict(n=n, batch_size=max(1, opts.batch_size // n), device=device)
    with progress(len(prompt_ids), f"sampling {n} responses from the trained model", unit="prompt") as bar:
        policy_samples = sample_responses(model, tokenizer, prompt_ids, sampling=sampling, progress=bar, **generate)
    with as_reference(reference) as base, progress(len(prompt_ids), f"sampling {n} responses from the base",
                                                   unit="prompt") as bar:
        base_samples = sample_responses(base, tokenizer, prompt_ids, sampling=sampling, progress=bar, **generate)
    groups = [i for i in range(len(prompt_ids)) for _ in range(n)]
    flat_prompts = [prompt_ids[g] for g in groups]
    policy_flat = [r for rs in policy_samples for r in rs]
    base_flat = [r for rs in base_samples for r in rs]

    if sampling.exact:
        kl_samples = policy_flat
    else:
        with progress(len(prompt_ids), "sampling the trained model for the KL", unit="prompt") as bar:
            kl_samples = [r for rs in sample_responses(model, tokenizer, prompt_ids, progress=bar, **generate,
                                                       sampling=Sampling(max_new_tokens=max_new, seed=opts.seed))
                          for r in rs]
    score = dict(batch_size=opts.batch_size, device=device, pad_id=tokenizer.pad_token_id)
    model.eval()
    with progress(2 * len(kl_samples), "KL: scoring the samples under both models", unit="response") as bar:
        policy_logps = response_logps(model, flat_prompts, kl_samples, progress=bar, **score)
        with as_reference(reference) as base:
            ref_logps = response_logps(base, flat_prompts, kl_samples, progress=bar, **score)
    results["kl"] = {**kl_estimate(policy_logps, ref_logps, groups), "responses": len(kl_samples),
                     "from_separate_samples": not sampling.exact}

    eos = tokenizer.eos_token_id
    sides = {"policy": policy_flat, "base": base_flat}
    results["generation"] = {
        "prompts": len(prompt_ids), "prompt_source": source, "samples_per_prompt": n, "sampling": dataclasses.asdict(sampling),
        **{f"{side}_mean_tokens": sum(len(r) - (r[-1:] == [eos]) for r in rs) / len(rs) for side, rs in sides.items()},
        **{f"{side}_ended_with_eos": sum(r[-1:] == [eos] for r in rs) / len(rs) for side, rs in sides.items()},
    }
    texts = {side: tokenizer.batch_decode(rs, skip_special_tokens=True) for side, rs in sides.items()}
    judge_prompts = [prompt_texts[g] for g in groups]
    results["samples"] = [{"prompt": p, "policy": a, "base": b} for p, a, b in
                          zip(judge_prompts, texts["policy"], texts["base"])]
    if judge_spec != "none":
        judge = build_judge(judge_spec, device, seed=opts.seed, instruction=opts.judge_instruction)
        outcomes, details = judge.compare(judge_prompts, texts["policy"], texts["base"])
        win = load_metric("win_rate").compute(outcomes=outcomes, groups=groups, seed=opts.seed)
        results["win_rate"] = {"judge": judge.name, **win,
                               "wilson": list(wilson_interval(win["wins"] + win["ties"] / 2, win["comparisons"]))}
        for sample, outcome in zip(results["samples"], outcomes):
            sample["outcome"] = outcome
        if isinstance(judge, ScoreJudge):
            scores, base_scores = details.pop("scores"), details.pop("baseline_scores")
            for sample, a, b in zip(results["samples"], scores, base_scores):
                sample["policy_score"], sample["base_score"] = a, b
            policy_mean, policy_err = mean_and_stderr(scores, groups)
            base_mean, base_err = mean_and_stderr(base_scores, groups)
            results["reward"] = {"judge": judge.name, "policy_mean": policy_mean, "policy_stderr": policy_err,
                                 "base_mean": base_mean, "base_stderr": base_err}
        results["win_rate"].update(details)
    return results


def output_dir_for(path: str) -> str:
    """Where results go by default: ``<run>/eval`` (beside ``model/`` when given the model folder)."""
    run = os.path.dirname(os.path.normpath(path)) if os.path.basename(os.path.normpath(path)) == "model" else path
    return os.path.join(run, FOLDER)
