"""The built-in preference set, after the DPO paper's controlled-sentiment task (Rafailov et al. 2023, sec. 6.1).

Short movie-review openings written for this project are continued by the reference model itself (several sampled
completions per prompt); the VADER sentiment analyzer scores each completion, and the most and the least positive
completion of a prompt become chosen and rejected when their scores differ by at least ``min_score_gap`` (and
the second most against the second least, and so on, up to ``pairs_per_prompt`` pairs). A DPO run
on these pairs should make the model's continuations more positive. Held-out prompts (``eval_prompts``) give the
eval pairs and never appear in training.

The set is built on first use, on the main process, and cached as JSON lines named by a fingerprint of its settings,
the prompts and the generating model, so a change of any of them rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
from typing import Any, Callable

import torch

from dpo_dist.config import SENTIMENT_PROMPTS, check_sentiment
from dpo_dist.progress import progress

logger = logging.getLogger(__name__)

VERSION = 1

FILMS = [
    "the new space western", "this quiet family drama", "the latest superhero sequel", "that black-and-white noir",
    "the animated film about a lost robot", "this three-hour historical epic", "the low-budget horror movie",
    "the romantic comedy set in Paris", "this documentary about deep-sea fish", "the heist thriller",
    "the musical remake", "this war film", "the coming-of-age story", "the courtroom drama", "this silent film revival",
    "the kung fu comedy", "the time-travel mystery", "this biopic of a jazz pianist", "the zombie road movie",
    "the sports drama about a small-town team", "this slow-burn art film", "the disaster movie",
    "the children's fantasy adventure", "this political satire", "the spy film", "the nature documentary",
    "the psychological thriller", "this period romance", "the stop-motion fairy tale", "the science fiction epic",
]
OPENINGS = [
    "I watched {film} last night, and",
    "My honest review of {film}:",
    "Having just seen {film}, I have to say",
    "Ten minutes into {film}, I",
    "Everyone told me {film} would be",
    "The ending of {film}",
    "I went to {film} with my friends and",
    "Compared with the trailer, {film}",
]


def prompts() -> list[str]:
    """240 prompts (``SENTIMENT_PROMPTS``, which the config validates against): every opening with every film."""
    texts = [opening.format(film=film) for film in FILMS for opening in OPENINGS]
    assert len(texts) == SENTIMENT_PROMPTS, "config.SENTIMENT_PROMPTS must count the built-in prompts"
    return texts


def vader_scores(texts: list[str]) -> list[float]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the built-in sentiment set needs VADER: python3 -m pip install vadersentiment") from None
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def dataset_paths(settings: Any, model_identity: dict, root: str) -> tuple[str, str]:
    """The cached train and eval files for these settings, prompts and generating model."""
    parts = {"version": VERSION, "settings": dataclasses.asdict(settings), "prompts": prompts(), "model": model_identity}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    base = os.path.join(root, "data", f"sentiment-{key}")
    return f"{base}-train.jsonl", f"{base}-eval.jsonl"


def prompts_path(paths: tuple[str, str]) -> str:
    """Where the data build records the held-out prompts, beside the cached train and eval files."""
    return paths[1].removesuffix("-eval.jsonl") + "-eval-prompts.jsonl"


def chosen_prompts(settings: Any) -> tuple[list[str], list[str]]:
    """The ``num_prompts`` prompts used, in a seeded order, split into training and held-out prompts (the last
    ``eval_prompts``)."""
    texts = prompts()
    random.Random(settings.seed).shuffle(texts)
    texts = texts[: settings.num_prompts]
    cut = settings.num_prompts - settings.eval_prompts
    return texts[:cut], texts[cut:]


def write_held_out_prompts(settings: Any, path: str) -> list[str]:
    """Every held-out prompt, ``{"prompt": ...}`` a line, whether or not its completions made a pair: what evaluation
    samples from."""
    held_out = chosen_prompts(settings)[1]
    handle, tmp = tempfile.mkstemp(prefix=".sentiment-", dir=os.path.dirname(path))
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        for text in held_out:
            out.write(json.dumps({"prompt": text}) + "\n")
    os.replace(tmp, path)
    return held_out


class _EachToken:
    """A ``generate`` stopping criterion that never stops generation itself: at every new token it counts the tokens
    sampled (``bar``) and calls ``stop_check``, which raises to abandon the build (a stop signal: the process is being
    preempted)."""

    def __init__(self, stop_check: Callable[[], None] | None, bar: Any):
        self.stop_check, self.bar, self.counted = stop_check, bar, 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.bar.update(input_ids.shape[0])  # a token for each sequence of the batch
        self.counted += input_ids.shape[0]
        if self.stop_check is not None:
            self.stop_check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample_completions(model: Any, tokenizer: Any, texts: list[str], settings: Any, device: torch.device,
                       stop_check: Callable[[], None] | None = None, shown: bool = True) -> list[list[str]]:
    """``completions_per_prompt`` sampled continuations of each prompt (temperature 1, no top-k/top-p).
    ``stop_check`` is called at every generated token and may raise to stop sampling. ``shown``: progress, counted
    in sampled tokens (:mod:`dpo_dist.progress`)."""
    from transformers import StoppingCriteriaList

    torch.manual_seed(settings.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    k = settings.completions_per_prompt
    out: list[list[str]] = []
    total = len(texts) * k * settings.max_new_tokens  # a batch whose sequences all end early counts its rest at once
    try:
        with progress(total, "sampling the sentiment set", unit="token", shown=shown) as bar:
            for start in range(0, len(texts), 32):
                batch = tokenizer(texts[start : start + 32], return_tensors="pt", padding=True).to(device)
                each_token = _EachToken(stop_check, bar)
                generated = model.generate(
                    **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=settings.max_new_tokens, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                    use_cache=True, stopping_criteria=StoppingCriteriaList([each_token]),
                )
                bar.update(len(texts[start : start + 32]) * k * settings.max_new_tokens - each_token.counted)
                decoded = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                out += [decoded[i : i + k] for i in range(0, len(decoded), k)]
    finally:
        tokenizer.padding_side = side
    return out


def build_pairs(model: Any, tokenizer: Any, settings: Any, device: torch.device,
                stop_check: Callable[[], None] | None = None, shown: bool = True) -> list[dict[str, Any]]:
    """Sample, score and pair; each row says its split (``train`` or ``eval``, by prompt). ``stop_check``, ``shown``:
    see :func:`sample_completions`."""
    check_sentiment(settings)
    train_prompts, held_out = chosen_prompts(settings)
    was_training = model.training
    model.eval()
    completions = sample_completions(model, tokenizer, train_prompts + held_out, settings, device, stop_check, shown)
    model.train(was_training)
    rows = []
    for index, (prompt, texts) in enumerate(zip(train_prompts + held_out, completions)):
        texts = [t for t in texts if t.strip()]
        scores = vader_scores(texts)
        ranked = sorted(range(len(texts)), key=scores.__getitem__, reverse=True)
        split = "eval" if index >= len(train_prompts) else "train"
        # The i-th most positive against the i-th least positive, while they are distinct and far enough apart.
        for i in range(min(settings.pairs_per_prompt, len(ranked) // 2)):
            best, worst = ranked[i], ranked[-1 - i]
            if scores[best] - scores[worst] < settings.min_score_gap:
                break
            rows.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst],
                         "chosen_score": scores[best], "rejected_score": scores[worst], "split": split})
    return rows


def ensure_sentiment_data(sampler: Callable[[], Any], tokenizer: Any, settings: Any, model_identity: dict,
                          device: torch.device, root: str, stop_check: Callable[[], None] | None = None,
                          shown: bool = True) -> tuple[str, str]:
    """The cached train and eval JSON-lines files, built first if absent, sampling from the model ``sampler()``
    returns (called only then), and the held-out prompts beside them (:func:`prompts_path`). Call on the main process
    only. ``stop_check`` is called at every sampled token and may raise: then nothing is written. ``shown``: the
    sampling's progress."""
    paths = dataset_paths(settings, model_identity, root)
    if all(os.path.isfile(p) for p in paths):
        if not os.path.isfile(prompts_path(paths)):  # a set cached before the prompts were recorded
            write_held_out_prompts(settings, prompts_path(paths))
        return paths
    logger.info("building the sentiment preference set (%d prompts x %d completions) into %s",
                settings.num_prompts, settings.completions_per_prompt, os.path.dirname(paths[0]))
    by_split: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for row in build_pairs(sampler(), tokenizer, settings, device, stop_check, shown):
        by_split[row.pop("split")].append(row)
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    for split, path in zip(("train", "eval"), paths):
        handle, tmp = tempfile.mkstemp(prefix=".sentiment-", dir=os.path.dirname(path))
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for row in by_split[split]:
                out.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    write_held_out_prompts(settings, prompts_path(paths))
    logger.info("sentiment set: %d train pairs, %d eval pairs (prompts whose completions differ by less than %.2f "
                "in VADER score make no pair)", len(by_split["train"]), len(by_split["eval"]), settings.min_score_gap)
    return paths
