"""What iterative rounds write in the run's output folder, and their one reader.

    <output_dir>/rounds.jsonl          one line per finished round (ROUND_KEYS at least)
    <output_dir>/rounds.png            eval score against KL to the starting model, the starting model included
    <output_dir>/round-0/              the starting model's held-out samples and their scores (once)
    <output_dir>/round-<r>/plan.json   the round's first step, the policy it samples from, its steps once known
    <output_dir>/round-<r>/samples-<key>/   sampled completions, a file per batch (the sampling cache)
    <output_dir>/round-<r>/samples.jsonl    every prompt's completions (text) with their judge scores
    <output_dir>/round-<r>/ranked.jsonl     what pairs are made from: each prompt's distinct non-empty completions
    <output_dir>/round-<r>/pairs.jsonl      the round's training pairs, with their scores
    <output_dir>/round-<r>/pair_counts.json what pairing kept and left out (the round's line reads it)
    <output_dir>/round-<r>/reference/       the reference log-probs of the round's pairs (the reference cache)
    <output_dir>/round-<r>/eval.json        the round's evaluation; eval_samples.jsonl its judged samples
    <output_dir>/round-<r>/seconds.json     seconds spent in each stage so far (a resumed stage adds up)

Every file is written whole (a temporary file renamed), so a file that is there is complete: a resumed round
takes it and goes on from the next stage.
"""

from __future__ import annotations

import json
import os
from typing import Any

ROUNDS_FILE = "rounds.jsonl"
PLOT_FILE = "rounds.png"
# What every rounds.jsonl line holds (more keys may follow); the README's table shows them.
ROUND_KEYS = ("round", "pairs", "dropped_pairs", "mean_score", "eval_score", "win_rate", "kl", "seconds")
STAGES = ("sampling", "judging", "pairing", "reference", "training", "eval")


def round_dir(output_dir: str, r: int) -> str:
    return os.path.join(output_dir, f"round-{r}")


def write_json(path: str, value: Any) -> None:
    """Whole or not at all: written to a temporary file, then renamed over ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, separators=(",", ":"))
    os.replace(path + ".tmp", path)


def read_json(path: str) -> Any | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_lines(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def read_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def finished_rounds(output_dir: str) -> list[dict[str, Any]]:
    """The rounds.jsonl lines written so far, in round order."""
    return read_lines(os.path.join(output_dir, ROUNDS_FILE))


def append_round(output_dir: str, line: dict[str, Any]) -> None:
    """Add a finished round's line; a line for the same round (a round redone after its line was written, its
    evaluation stopped in between) replaces it, so the file holds each round once."""
    lines = [old for old in finished_rounds(output_dir) if old["round"] != line["round"]] + [line]
    write_lines(os.path.join(output_dir, ROUNDS_FILE), sorted(lines, key=lambda x: x["round"]))


def add_seconds(output_dir: str, r: int, stage: str, seconds: float) -> dict[str, float]:
    """Add ``seconds`` to the round's ``stage`` (a stage stopped and redone counts both tries); returns them all."""
    path = os.path.join(round_dir(output_dir, r), "seconds.json")
    spent = read_json(path) or {}
    spent[stage] = spent.get(stage, 0.0) + seconds
    write_json(path, spent)
    return spent


def rounds_table(lines: list[dict[str, Any]], start_score: float | None = None) -> str:
    """The rounds as a markdown table (what the README shows); the starting model's eval score as round 0."""
    head = "| round | pairs | dropped pairs | mean score (sampled) | eval score | win rate vs start | KL to start | seconds |"
    rows = [head, "|" + "---|" * 8]
    if start_score is not None:
        rows.append(f"| 0 (start) | - | - | - | {start_score:.3f} | - | 0 | - |")
    for line in lines:
        rows.append(f"| {line['round']} | {line['pairs']} | {line['dropped_pairs']} | {line['mean_score']:.3f} | "
                    f"{line['eval_score']:.3f} | {line['win_rate']:.3f} | {line['kl']:.3f} | {line['seconds']:.0f} |")
    return "\n".join(rows)


def plot_rounds(lines: list[dict[str, Any]], path: str) -> None:
    """Eval score against KL to the starting model, a point per round and the starting model at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not lines:
        return
    kls = [0.0] + [line["kl"] for line in lines]
    scores = [lines[0]["start_eval_score"]] + [line["eval_score"] for line in lines]
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(kls, scores, marker="o")
    for label, kl, score in zip(["start"] + [f"round {line['round']}" for line in lines], kls, scores):
        axes.annotate(label, (kl, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("KL to the starting model (nats per completion)")
    axes.set_ylabel("eval score (mean judge score, held-out prompts)")
    axes.set_title(f"iterative DPO: {lines[0].get('judge', 'judge')}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
