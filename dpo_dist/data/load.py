"""Load preference pairs from local files or the Hub, validate every row, subset and split.

    pairs, report = load_pairs("data/train.jsonl.gz")                  # fails on the first bad row, naming it
    pairs, report = load_pairs("Anthropic/hh-rlhf", on_bad_row="skip")  # skips bad rows, counts them by reason
    pairs, report = load_pairs("chat.jsonl", tokenizer=tokenizer)       # also renders each conversation's template
    train, eval_ = split_pairs(pairs, eval_ratio=0.05, seed=42)

A bad row is never silently kept or dropped: by default loading stops with :class:`DataError` naming the source, the
row index (0-based, in the source's order) and the reason; with ``on_bad_row="skip"`` it is left out and counted in
``LoadReport.skipped`` by reason.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import datasets

from dpo_dist.data.formats import FORMATS, RowError, detect_format, normalize_row
from dpo_dist.data.tokenization import render_conversation

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Preference data that cannot be used as given; the message names the file, row or key."""


@dataclass
class LoadReport:
    source: str
    data_format: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept ({self.data_format} format)"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return text


def load_pairs(
    source: str,
    *,
    split: str = "train",
    data_format: str = "auto",
    on_bad_row: Literal["error", "skip"] = "error",
    hh_as_messages: bool = False,
    tokenizer: Any = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load, validate and normalize preference pairs.

    Args:
        source: a local ``.json`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file, a local dataset folder, or a Hub
            dataset name (``datasets.load_dataset``).
        split: the split to take from a folder or Hub dataset.
        data_format: ``auto`` (detected from the first row), or one of ``text``, ``conversational``, ``hh``.
        on_bad_row: ``error`` stops at the first bad row; ``skip`` leaves bad rows out and counts them.
        hh_as_messages: turn HH transcripts into chat messages, to be rendered with the tokenizer's chat template.
        tokenizer: when given, every conversational pair is rendered with its chat template while loading, so a row
            the template rejects (a role it does not accept, say) is a bad row like any other (``template_error``),
            named or skipped here rather than failing tokenization later.

    Returns:
        A dataset with columns ``prompt``, ``chosen``, ``rejected`` (strings, or message lists for conversational
        data) and ``row`` (the row's index in the source), and the report of what was read, kept and skipped.
    """
    if data_format != "auto" and data_format not in FORMATS:
        raise DataError(f"data_format {data_format!r} is not one of: auto, {', '.join(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row {on_bad_row!r} is not one of: error, skip")
    report = LoadReport(source=source, data_format=data_format)
    pairs: list[dict[str, Any]] = []
    for index, raw in enumerate(_read_rows(source, split)):
        report.rows_read += 1
        try:
            if not isinstance(raw, dict):
                raise RowError("wrong_type", f"row should be a JSON object, got {type(raw).__name__}")
            if report.data_format == "auto":
                report.data_format = detect_format(raw)
            pair = normalize_row(raw, report.data_format, hh_as_messages=hh_as_messages)
            if tokenizer is not None and isinstance(pair["prompt"], list):
                render_conversation(pair, tokenizer)
        except RowError as error:
            if on_bad_row == "error":
                raise DataError(
                    f"{source}: row {index}: {error} (pass on_bad_row=skip to leave such rows out)"
                ) from None
            report.skipped[error.reason] += 1
            continue
        pair["row"] = index
        pairs.append(pair)
    report.rows_kept = len(pairs)
    if not pairs:
        raise DataError(f"{source}: no usable rows ({report.summary()})")
    logger.debug(report.summary())  # returned too: the trainer prints it once (it was logged and printed)
    return datasets.Dataset.from_list(pairs), report


def _read_rows(source: str, split: str) -> Iterator[Any]:
    if os.path.isfile(source):
        if source.endswith(JSON_SUFFIXES):
            yield from _read_json(source)
            return
        if source.endswith(PARQUET_SUFFIXES):
            yield from datasets.load_dataset("parquet", data_files=source, split="train")
            return
        raise DataError(
            f"{source}: unsupported file type; use one of {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    if source.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES) and not os.path.exists(source):
        raise DataError(f"{source}: no such file")
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # the Hub and the folder loader raise many kinds
        raise DataError(f"{source}: could not load split {split!r}: {error}") from error
    yield from dataset


def _read_json(path: str) -> Iterator[Any]:
    """JSON lines (one object a line) or one JSON array, optionally gzipped; errors name the line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        head = handle.read(1)
        while head and head.isspace():
            head = handle.read(1)
        if head == "[":
            try:
                rows = json.loads(head + handle.read())
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: invalid JSON: {error}") from None
            yield from rows
            return
        for number, line in enumerate(_prepend(head, handle), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: invalid JSON: {error}") from None


def _prepend(first: str, handle: Any) -> Iterator[str]:
    first_line = first + handle.readline()
    yield first_line
    yield from handle


def take_subset(pairs: datasets.Dataset, num_samples: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``num_samples`` pairs (all pairs when None or when fewer exist)."""
    if num_samples is None or num_samples >= len(pairs):
        if num_samples is not None:
            logger.warning("num_samples=%d but only %d pairs exist: using all of them", num_samples, len(pairs))
        return pairs
    if num_samples < 1:
        raise DataError(f"num_samples must be at least 1, got {num_samples}")
    return pairs.shuffle(seed=seed).select(range(num_samples))


def split_pairs(
    pairs: datasets.Dataset, *, eval_ratio: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split into train and eval by ratio with a fixed seed; ``eval_ratio=0`` gives no eval split."""
    if not 0.0 <= eval_ratio < 1.0:
        raise DataError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0.0:
        return pairs, None
    n_eval = max(1, round(len(pairs) * eval_ratio))
    if n_eval >= len(pairs):
        raise DataError(f"eval_ratio={eval_ratio} leaves no training pairs out of {len(pairs)}")
    parts = pairs.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_train_eval(
    source: str,
    *,
    split: str = "train",
    eval_source: str | None = None,
    eval_split: str | None = None,
    eval_ratio: float = 0.0,
    num_samples: int | None = None,
    seed: int = 42,
    **load_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[LoadReport]]:
    """Train and eval pairs: a given eval file or split when named, else a seeded split by ``eval_ratio``.

    ``num_samples`` takes a seeded subset of the training source first (before a ratio split, so eval comes out of
    the same subset); a given eval set is used whole. ``load_kwargs`` go to :func:`load_pairs`.
    """
    pairs, report = load_pairs(source, split=split, **load_kwargs)
    pairs = take_subset(pairs, num_samples, seed)
    if eval_source is None and eval_split is None:
        train, eval_ = split_pairs(pairs, eval_ratio=eval_ratio, seed=seed)
        return train, eval_, [report]
    if eval_ratio:
        raise DataError("give either eval_ratio or an eval file/split, not both")
    if eval_source is None and os.path.isfile(source):
        raise DataError(f"{source} is a file, which has no splits: an eval split names a split of a dataset folder or "
                        "Hub dataset; for a file give a separate eval file (data.eval_source) or data.eval_ratio")
    eval_, eval_report = load_pairs(eval_source or source, split=eval_split or split, **load_kwargs)
    return pairs, eval_, [report, eval_report]
