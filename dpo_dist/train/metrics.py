"""What a user sees: ``metrics.jsonl`` (one JSON object per optimizer step), ``samples.jsonl`` (completions of
held-out prompts at sampling steps), trackers, a summary, a plot and ``run.json`` (pair counts, which step's
weights were exported).

Step metrics, each a mean over every pair of the optimizer step on every process:

- ``loss``: the preference loss (the weighted sum of ``loss.loss_type``'s losses, times the WPO weight with
  ``loss.use_weighting``; plus the RPO term when ``loss.rpo_alpha`` > 0);
- ``rewards/chosen``, ``rewards/rejected``: beta x (policy - reference) log-prob of each response (LD-DPO's weighted
  log-probs with ``loss.ld_alpha``; simpo, orpo: beta x the policy's log-prob per token);
- ``rewards/margins``: chosen minus rejected reward; ``rewards/accuracies``: fraction of pairs with chosen > rejected;
- ``logps/chosen``, ``logps/rejected``: the policy's summed log-prob of each response;
- ``grad_norm`` (before clipping), ``lr``, ``tokens/s`` (non-padding tokens), ``step_time_s``, ``examples_seen``, ``epoch``;
- ``eval/*``: the same pair metrics on the eval split, at eval steps.

Ranking mode (groups of k responses ranked best first, ``loss.loss_type=plackett_luce``) has two accuracies of its own,
pooled over every group of the step (:func:`ranking_counts`, :func:`ranking_accuracies`; the training loop does not
log them yet):

- ``rewards/ranking_accuracies``: the share of ordered pairs (i ranked above j, in the same group) with r_i > r_j;
- ``rewards/top1_accuracies``: the share of groups whose best-ranked response has the highest reward.

Both count a tie as wrong, as ``rewards/accuracies`` does (so both are 0 at policy = reference), and both are
``rewards/accuracies`` when k = 2.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from dpo_dist.config import STATS, Config, flatten, to_dict

METRICS_FILE = "metrics.jsonl"  # one record per optimizer step: MetricsLog, read_metrics
RUN_FILE = "run.json"  # {"pairs": {...}, "model_step": N, "model": "<which weights>"}: write_run_file, read_run_file


class MetricsLog:
    """Appends records to ``<output_dir>/metrics.jsonl`` on the main process and forwards them to trackers."""

    def __init__(self, output_dir: str, accelerator: Any, *, resume_step: int = 0):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        self.accelerator = accelerator
        self.records: list[dict[str, Any]] = []
        if accelerator.is_main_process:
            self.records = keep_until(self.path, resume_step)  # a resumed run continues the log, no duplicates
            if os.path.isfile(self.samples_path):
                keep_until(self.samples_path, resume_step)

    def whole(self) -> list[dict[str, Any]]:
        """Every record of the run, from ``metrics.jsonl`` (a resumed run's earlier steps included); main process."""
        return read_metrics(self.path) if self.accelerator.is_main_process else []

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.records.append(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def write_samples(self, rows: list[dict[str, Any]]) -> None:
        """Completions of one sampling step (:mod:`dpo_dist.train.samples`): appended to ``samples.jsonl``, a table
        to wandb (``samples``), markdown text to tensorboard (``samples``). Other trackers get no samples."""
        if not self.accelerator.is_main_process or not rows:
            return
        step = rows[0]["step"]
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log_table("samples", columns=["step", "prompt", "completion"],
                                  data=[[r["step"], r["prompt"], r["completion"]] for r in rows], step=step)
            elif tracker.name == "tensorboard":
                tracker.log({"samples": samples_markdown(rows)}, step=step)


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of prompts and completions (what tensorboard's text tab renders)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | completion |", "|---|---|"]
    return "\n".join(lines + [f"| {cell(r['prompt'])} | {cell(r['completion'])} |" for r in rows])


def keep_until(path: str, step: int) -> list[dict[str, Any]]:
    """Rewrite the JSON-lines file at ``path`` with its records of steps up to ``step`` (none for 0); returns them."""
    kept = [r for r in read_metrics(path) if r["step"] <= step] if step else []
    with open(path, "w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record) + "\n")
    return kept


def write_run_file(output_dir: str, *, pairs: dict[str, Any], model_step: int, model: str) -> None:
    """``run.json``: the pair counts the run trained and evaluated on, and the step whose weights ``model/`` holds (the
    best one's under early stopping) with a line saying which; the model card reads it."""
    path = os.path.join(output_dir, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"pairs": pairs, "model_step": model_step, "model": model}, handle, indent=1)
    os.replace(path + ".tmp", path)


def read_run_file(output_dir: str) -> dict[str, Any]:
    """What :func:`write_run_file` wrote in ``output_dir``; empty when it is not there (a run that did not finish)."""
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summary(records: list[dict[str, Any]]) -> str:
    """A few lines: first and last training values, and the last eval."""
    if not records:
        return "no optimizer step was taken"
    first, last = records[0], records[-1]
    lines = [f"steps: {last['step']}, pairs seen: {last['examples_seen']}, epochs: {last['epoch']:.2f}"]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        lines.append(f"{key:>20}: {first[key]: .4f} (step {first['step']}) -> {last[key]: .4f} (step {last['step']})")
    evals = [r for r in records if "eval/loss" in r]
    if evals:
        e = evals[-1]
        lines.append(
            f"eval (step {e['step']}): loss {e['eval/loss']:.4f}, reward accuracy {e['eval/rewards/accuracies']:.3f}, "
            f"margin {e['eval/rewards/margins']:.4f}"
        )
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Training curves (and eval points) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in records]
    panels = [("loss", ["loss"]), ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
              ("accuracy", ["rewards/accuracies"])]
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            axis.plot(steps, [r[key] for r in records], label=f"train {key}")
            evals = [(r["step"], r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
            if evals:
                axis.plot(*zip(*evals), "o--", label=f"eval {key}")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def reduce_stats(stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Means over pairs (tokens: the sum); rankings' rows carry their :func:`ranking_counts` after the STATS columns,
    which add ``rewards/ranking_accuracies`` and ``rewards/top1_accuracies`` (pooled, :func:`ranking_accuracies`).
    Shape: stats (N, len(STATS)), or (N, len(STATS) + len(RANKING_COUNTS)) for rankings."""
    values = dict(zip(STATS, stats[:, :len(STATS)].double().mean(0).tolist()))
    values["tokens"] = float(stats[:, STATS.index("tokens")].sum())
    values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
    if stats.shape[1] > len(STATS):
        values.update(ranking_accuracies(stats[:, len(STATS):]))
    return {f"{prefix}{k}": v for k, v in values.items() if not (prefix and k == "tokens")}


def stats_width(responses: str) -> int:
    """The columns of a batch's statistics: STATS, and for rankings (``data.responses``) their RANKING_COUNTS."""
    return len(STATS) + (len(RANKING_COUNTS) if responses == "ranking" else 0)


# The columns of ranking_counts, per group: sums over groups (and processes) reduce them.
RANKING_COUNTS = ("pairs_in_order", "pairs", "top1_hits", "ranked_groups")


def ranking_counts(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per group of responses ranked best first along K: how many of its ordered pairs have their rewards in the
    labelled order, how many ordered pairs it has (k (k - 1) / 2), whether its best response's reward is above every
    other's (a top-1 hit), and whether it is a ranking at all (k >= 2). A tie is out of order, and not a hit.

    ``rewards``: implicit rewards ``beta * (policy_logps - ref_logps)`` (:func:`dpo_dist.train.loss.ranking_loss`);
    ``mask``: True where a response exists (padding at any position; the best is the first present). Counts, not
    shares, so that groups of different k pool by sums across micro-batches and processes.

    Shape: rewards, mask (G, K) -> (G, len(RANKING_COUNTS)), float.
    """
    k_max = rewards.shape[1]
    above = torch.ones(k_max, k_max, dtype=torch.bool, device=rewards.device).triu(diagonal=1)  # [i, j]: i above j
    pairs = above & mask[:, :, None] & mask[:, None, :]  # (G, K, K)
    in_order = pairs & (rewards[:, :, None] > rewards[:, None, :])
    best = mask.int().argmax(dim=1)  # the first response present: argmax takes the first of equal maxima
    best_reward = rewards.gather(1, best[:, None])  # (G, 1)
    others = mask & (torch.arange(k_max, device=rewards.device)[None, :] != best[:, None])
    ranked = mask.sum(dim=1) >= 2
    hits = ranked & (best_reward > rewards).logical_or(~others).all(dim=1)
    return torch.stack([in_order.sum(dim=(1, 2)), pairs.sum(dim=(1, 2)), hits, ranked], dim=1).to(rewards.dtype)


def ranking_accuracies(counts: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Ranking accuracy (ordered pairs in order over all pairs) and top-1 accuracy (hits over groups of two or more),
    pooled over every group given, not averaged per group; NaN where there is nothing to count.

    Shape: counts (N, len(RANKING_COUNTS)), from :func:`ranking_counts` -> two numbers.
    """
    total = dict(zip(RANKING_COUNTS, counts.double().sum(dim=0).tolist()))

    def share(part: str, whole: str) -> float:
        return total[part] / total[whole] if total[whole] else math.nan

    return {f"{prefix}rewards/ranking_accuracies": share("pairs_in_order", "pairs"),
            f"{prefix}rewards/top1_accuracies": share("top1_hits", "ranked_groups")}


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on CUDA, resident memory (max RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def held_state_gb(model: Any, optimizer: Any) -> float:
    """GiB of parameters, gradients and optimizer state this process holds (each tensor once): what ZeRO and FSDP
    shard.

    Under ZeRO-3 a parameter's local part is ``param.ds_tensor``; DeepSpeed's inner optimizer holds flat fp32
    partitions and their AdamW moments, reached by unwrapping ``.optimizer``. Under FSDP2 parameters, gradients and
    AdamW moments are ``DTensor``s, counted by their local shards.
    """
    seen: dict[int, int] = {}

    from torch.distributed.tensor import DTensor

    def count(tensor: Any) -> None:
        if isinstance(tensor, DTensor):  # FSDP2: this process's shard
            tensor = tensor.to_local()
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()

    for param in model.parameters():
        count(getattr(param, "ds_tensor", param))
        count(param.grad)
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    for group in inner.param_groups:
        for param in group["params"]:
            count(param)
            count(param.grad)
    for state in inner.state.values():
        for value in state.values():
            count(value)
    return sum(seen.values()) / 2**30


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"train.learning_rate": 0.0002, ...}``: what trackers show as the run's hyperparameters."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(to_dict(cfg))}
