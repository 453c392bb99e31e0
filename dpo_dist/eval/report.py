"""Evaluation results as files: ``results.json``, ``results.md`` (a markdown table), ``samples.jsonl`` (every
judged pair of responses) and, for score judges, ``reward_vs_kl.png`` (the axes of the DPO paper's Figure 2)."""

from __future__ import annotations

import json
import os
from typing import Any

from dpo_dist.config import JUDGE_KINDS

FOLDER = "eval"  # where launch/evaluate.py writes a run's report by default: <run>/eval
RESULTS_FILE = "results.json"  # the results without the samples: write_report, read_results


def markdown(results: dict[str, Any]) -> str:
    p, kl, g = results["preference"], results["kl"], results["generation"]
    lines = [f"# {results['model']} against its base {results['base']}", ""]
    if p is None:
        lines += ["No held-out pairs: the run has no eval split (pass --eval_source FILE for pair metrics).", ""]
    else:
        lines += [
            f"## Held-out pairs ({p['pairs']})", "",
            "| reward accuracy | 95% Wilson interval | mean margin | loss | reward chosen | reward rejected |",
            "|---|---|---|---|---|---|",
            f"| {p['reward_accuracy']:.3f} ({p['correct']} of {p['pairs']}) | {p['reward_accuracy_wilson'][0]:.3f}–"
            f"{p['reward_accuracy_wilson'][1]:.3f} | {p['margin']:.4f} | {p['loss']:.4f} | {p['rewards/chosen']:.4f} | "
            f"{p['rewards/rejected']:.4f} |", ""]
        if "rewards/ranking_accuracies" in p:  # rankings (data.responses=ranking): chosen the best, rejected the worst
            lines[-1:] = ["", f"Rankings: chosen is each one's best response, rejected its worst; ranking accuracy "
                              f"{p['rewards/ranking_accuracies']:.3f} (ordered pairs in order), top-1 accuracy "
                              f"{p['rewards/top1_accuracies']:.3f}.", ""]
    lines += [
        f"## Generations ({g['prompts']} held-out prompts x {g['samples_per_prompt']} samples, "
        f"temperature {g['sampling']['temperature']}, top-p {g['sampling']['top_p']}, top-k {g['sampling']['top_k']}, "
        f"at most {g['sampling']['max_new_tokens']} new tokens)", "",
        f"Prompts: {g['prompt_source']}.", "",
        "| | trained | base |", "|---|---|---|",
        f"| mean response length (tokens) | {g['policy_mean_tokens']:.1f} | {g['base_mean_tokens']:.1f} |",
        f"| ended with EOS | {g['policy_ended_with_eos']:.2f} | {g['base_ended_with_eos']:.2f} |",
    ]
    if "reward" in results:
        r = results["reward"]
        lines.append(f"| mean score: {r['judge']} | {r['policy_mean']:.4f} ± {r['policy_stderr']:.4f} | "
                     f"{r['base_mean']:.4f} ± {r['base_stderr']:.4f} |")
    lines += ["", f"KL(trained ‖ base) per response: {kl['kl']:.3f} ± {kl['kl_stderr']:.3f} nats "
              f"({kl['responses']} responses sampled from the trained model at temperature 1"
              + (", drawn for this estimate" if kl["from_separate_samples"] else "") + ")."]
    if "win_rate" in results:
        w = results["win_rate"]
        lines += ["", f"## Win rate against the base ({w['judge']})", "",
                  "| win rate | 95% interval (bootstrap over prompts) | 95% Wilson interval | wins | losses | ties | "
                  "comparisons |", "|---|---|---|---|---|---|---|",
                  f"| {w['win_rate']:.3f} | {w['ci_low']:.3f}–{w['ci_high']:.3f} | {w['wilson'][0]:.3f}–"
                  f"{w['wilson'][1]:.3f} | {w['wins']} | {w['losses']} | {w['ties']} | {w['comparisons']} |", "",
                  "Ties count half. The Wilson interval treats every comparison as independent; the bootstrap "
                  "resamples prompts (a prompt's samples are not independent), so it is the one to trust when they "
                  "differ."]
        if "judge_picked_a" in w:
            lines.append(f"The judge picked the response shown first in {w['judge_picked_a']:.2f} of comparisons "
                         f"(the trained model's was first in {w['responses_shown_as_a']}).")
    else:
        lines += ["", f"No win rate: no judge was given (--judge {' | '.join(JUDGE_KINDS)})."]
    return "\n".join(lines) + "\n"


def plot_reward_vs_kl(results: dict[str, Any], path: str) -> None:
    """Mean score against KL from the base: the base at KL 0, the trained model at its estimate, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, kl = results["reward"], results["kl"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar([0.0], [r["base_mean"]], yerr=[r["base_stderr"]], fmt="o", color="gray", capsize=3, label="base")
    ax.errorbar([kl["kl"]], [r["policy_mean"]], xerr=[kl["kl_stderr"]], yerr=[r["policy_stderr"]], fmt="o",
                color="C0", capsize=3, label="DPO")
    ax.set_xlabel("KL(trained ‖ base) per response (nats)")
    ax.set_ylabel(f"mean {r['judge'].split(' (')[0]} score")
    ax.set_title("reward vs KL on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: str, *, plot: bool = True) -> list[str]:
    """Write the files; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    summary = {k: v for k, v in results.items() if k != "samples"}
    for name, text in ((RESULTS_FILE, json.dumps(summary, indent=2) + "\n"), ("results.md", markdown(results)),
                       ("samples.jsonl", "".join(json.dumps(s) + "\n" for s in results["samples"]))):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)
        written.append(path)
    if plot and "reward" in results:
        path = os.path.join(out_dir, "reward_vs_kl.png")
        plot_reward_vs_kl(results, path)
        written.append(path)
    return written


def read_results(path: str) -> dict[str, Any]:
    """The results :func:`write_report` wrote to ``path`` (a ``results.json``)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
