"""Load preference pairs from local files or the Hub, validate every row, subset and split.

    pairs, report = load_pairs("data/train.jsonl.gz")                  # fails on the first bad row, naming it
    pairs, report = load_pairs("Anthropic/hh-rlhf", on_bad_row="skip")  # skips bad rows, counts them by reason
    pairs, report = load_pairs("chat.jsonl", tokenizer=tokenizer)       # also renders each conversation's template
    pairs, report = load_pairs("ultrafeedback.jsonl", columns={"prompt": "instruction", "score": "overall_score"},
                               pair_rule="best_vs_rest")                # ranked rows -> pairs, each with its group
    train, eval_ = split_pairs(pairs, eval_ratio=0.05, seed=42)        # a ranked row's pairs stay on one side

A bad row is never silently kept or dropped: by default loading stops with :class:`DataError` naming the source, the
row index (0-based, in the source's order) and the reason; with ``on_bad_row="skip"`` it is left out and counted in
``LoadReport.skipped`` by reason. A ranked row's candidate pairs that are tied or below ``min_score_gap`` are
counted too (``LoadReport.pairs_below_gap``), and so is a row left with no pair (``rows_without_pairs``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import datasets
import numpy
import pyarrow
import pyarrow.compute
import pyarrow.dataset

from dpo_dist.config import SENTIMENT, Config, ConfigError, check_mixture_keys, check_source, check_weights
from dpo_dist.data.formats import (FORMATS, RowError, detect_format, normalize_ranked, normalize_row, ranked_order,
                                   ranked_pairs, rename_columns, response_kind)
from dpo_dist.data.tokenization import GROUP, PART, RESPONSES_COLUMN, render_conversation
from dpo_dist.loss_types import RESPONSES

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Preference data that cannot be used as given; the message names the file, row or key."""


@dataclass
class LoadReport:
    source: str
    data_format: str
    split: str = "train"
    entry: str = "data.source"  # the config entry it loads: data.source, data.sources[i], data.eval_source/eval_split
    rows_read: int = 0
    rows_kept: int = 0  # rows that gave pairs (a pair row: its pair; a ranked row: at least one)
    skipped: Counter = field(default_factory=Counter)
    pairs: int = 0  # the kept rows' pairs (pair formats: one a row)
    pair_rule: str | None = None  # ranked rows: the rule that made their pairs (None: a pair format)
    min_score_gap: float = 0.0  # ranked rows: the least score gap a pair kept
    pairs_below_gap: int = 0  # ranked rows: candidate pairs dropped, tied or with a gap below min_score_gap
    rows_without_pairs: int = 0  # ranked rows left with no pair by min_score_gap (not kept)
    part: int | None = None  # the entry of a mixture (``data.sources[part]``); None for one source
    rows_subset: int | None = None  # a mixture's part after its num_samples / fraction (None: neither given)
    rows_used: int | None = None  # pairs a mixture's part put into the mixture (a weighted one's repeats counted)
    probability: float | None = None  # a weighted mixture's part: its weight, normalized

    def summary(self) -> str:
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept ({self.data_format} format)"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        if self.pair_rule is not None:
            if self.rows_without_pairs:
                text += f"; {self.rows_without_pairs} left with no pair"
            text += f"; {self.pairs} pairs by {self.pair_rule}"
            if self.pairs_below_gap:
                text += (f", {self.pairs_below_gap} dropped (tied or a gap below data.min_score_gap="
                         f"{self.min_score_gap:g})")
        if self.probability is not None:
            drawn_from = self.pairs if self.rows_subset is None else self.rows_subset
            if self.rows_subset is not None:
                text += f"; {self.rows_subset} in its subset"
            text += f"; {self.rows_used} used (probability {self.probability:.3g}"
            if self.rows_used == drawn_from:
                text += ": all of them"
            elif self.rows_used > drawn_from:
                text += f": all {drawn_from}, and {self.rows_used - drawn_from} repeats"
            text += ")"
        elif self.rows_used is not None:
            text += f"; {self.rows_used} used"
        return text if self.part is None else f"data.sources[{self.part}] {text}"


@dataclass(frozen=True)
class Part:
    """One source of a mixture (``data.sources``): where to read, and how much of it to use (``num_samples`` rows
    or a ``fraction`` of the kept rows, a seeded subset, a ranked row with all its pairs; all when neither).
    ``data_format`` None: the mixture's. ``weight``: its relative sampling probability in a weighted mixture
    (:func:`load_mixture`)."""

    source: str
    split: str = "train"
    config_name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    num_samples: int | None = None
    fraction: float | None = None
    data_format: str | None = None
    weight: float | None = None


NO_PAIR = "no_pair"  # not a RowError reason: a ranked row whose every pair min_score_gap dropped (counted apart)
# Rows of a JSON file as read: the row's JSON text and its line (0 in a JSON array), parsed and validated by map.
RAW_JSON = datasets.Features({"json": datasets.Value("string"), "line": datasets.Value("int64")})
TEXT_PAIR = datasets.Value("string")
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
INVALID_JSON = "invalid_json"  # not a RowError reason: a file that is not JSON stops loading, skip or not
AUTO_NUM_PROC_ROWS = 100_000  # num_proc=None: one process below this many rows, else up to 8


def auto_num_proc(num_proc: int | None, rows: int) -> int | None:
    """Processes for a ``datasets.map`` over ``rows`` rows: as given, else one (None) for small sets and this
    machine's CPUs (at most 8) for large ones."""
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if rows >= AUTO_NUM_PROC_ROWS else 1
    return num_proc if num_proc > 1 and rows > 1 else None


def load_pairs(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    data_dir: str | None = None,
    revision: str | None = None,
    data_format: str = "auto",
    on_bad_row: Literal["error", "skip"] = "error",
    hh_as_messages: bool = False,
    tokenizer: Any = None,
    num_proc: int | None = None,
    columns: dict[str, str] | None = None,
    pair_rule: str = "best_vs_worst",
    min_score_gap: float = 0.0,
    group_offset: int = 0,
    responses: str = "pairs",
) -> tuple[datasets.Dataset, LoadReport]:
    """Load, validate and normalize preference pairs.

    Rows are read into Arrow (``datasets``: memory-mapped, cached) and validated by ``datasets.map``, so a large set
    loads in bounded memory and a second load with the same file and settings reuses the cached result.

    Args:
        source: a local ``.json`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file, a local dataset folder (of
            parquet or jsonl shards, say), or a Hub dataset name (``datasets.load_dataset``).
        split: the split to take, slices included (``train[:5%]``); a file has one split, ``train``.
        config_name, data_dir, revision: passed to ``datasets.load_dataset`` (``name``, ``data_dir``, ``revision``)
            for a folder or Hub dataset.
        data_format: ``auto`` (detected from the first row), or one of ``text``, ``conversational``, ``hh``,
            ``ranked``.
        on_bad_row: ``error`` stops at the first bad row; ``skip`` leaves bad rows out and counts them.
        hh_as_messages: turn HH transcripts into chat messages, to be rendered with the tokenizer's chat template.
        tokenizer: when given, every conversational pair is rendered with its chat template while loading, so a row
            the template rejects (a role it does not accept, say) is a bad row like any other (``template_error``),
            named or skipped here rather than failing tokenization later.
        num_proc: processes for validation (None: :func:`auto_num_proc`).
        columns: our field names -> the dataset's (``data.columns``), applied to every row before it is read.
        pair_rule, min_score_gap: how a ranked row becomes pairs (:func:`~dpo_dist.data.formats.ranked_pairs`).
        group_offset: added to each row's index to make its ``group``, so that groups stay unique across the sources
            of one run (a mixture's parts, an eval set).
        responses: ``pairs``, or ``ranking`` (``data.responses``): each row becomes one record, with a ``responses``
            column holding its responses best first (a pair row: ``[chosen, rejected]``; a ranked row: all k, in
            the order of :func:`~dpo_dist.data.formats.ranked_order`, a row with ties or a chosen beside a list of
            rejected being bad, ``partial_order``), ``chosen`` the best and ``rejected`` the worst;
            ``pair_rule`` and ``min_score_gap`` are not used.

    Returns:
        A dataset with columns ``prompt``, ``chosen``, ``rejected`` (strings, or message lists for conversational
        data), ``row`` (the row's index in the split as loaded) and ``group`` (``group_offset + row``: a ranked
        row's pairs share it), one record per pair (``responses=ranking``: per row, with ``responses``), and the
        report of what was read, kept, skipped and dropped.
    """
    if data_format != "auto" and data_format not in FORMATS:
        raise DataError(f"data_format {data_format!r} is not one of: auto, {', '.join(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row {on_bad_row!r} is not one of: error, skip")
    raw, json_text = _raw_rows(source, split, config_name, data_dir, revision)
    release_arrow_memory()
    report = LoadReport(source=source, data_format=data_format, split=split, rows_read=len(raw))
    first = 0  # rows before the first one the format is detected from are bad rows (their detection fails)
    if data_format == "auto":
        first, report.data_format = _detect(raw, json_text, columns)
    kind = _ranked_kind(raw, json_text, columns, first) if report.data_format == "ranked" else None
    messages = (report.data_format == "conversational" or kind == "conversational"
                or (report.data_format == "hh" and hh_as_messages))
    pair_type = MESSAGES if messages else TEXT_PAIR
    if responses not in RESPONSES:
        raise DataError(f"responses {responses!r} is not one of: {', '.join(RESPONSES)}")
    ranking = responses == "ranking"
    features = datasets.Features({"prompt": pair_type, "chosen": pair_type, "rejected": pair_type,
                                  **({RESPONSES_COLUMN: datasets.List(pair_type)} if ranking else {}),
                                  "row": datasets.Value("int64"), GROUP: datasets.Value("int64"),
                                  "error": datasets.Value("string"), "reason": datasets.Value("string"),
                                  "dropped": datasets.Value("int64")})
    checked = raw.map(
        _validate_rows, batched=True, with_indices=True, remove_columns=raw.column_names, features=features,
        num_proc=auto_num_proc(num_proc, len(raw)), desc=f"validating {os.path.basename(source.rstrip('/'))}",
        fn_kwargs={"source": source, "data_format": report.data_format, "kind": kind, "first": first,
                   "json_text": json_text, "hh_as_messages": hh_as_messages, "tokenizer": tokenizer,
                   "empty": [] if messages else "", "columns": columns, "pair_rule": pair_rule,
                   "min_score_gap": min_score_gap, "group_offset": group_offset,
                   **({"ranking": True} if ranking else {})},  # pairs mode keeps its datasets fingerprint
    )
    if report.data_format == "ranked" and not ranking:
        report.pair_rule, report.min_score_gap = pair_rule, min_score_gap
        report.pairs_below_gap = pyarrow.compute.sum(checked.with_format("arrow")["dropped"]).as_py() or 0
        report.rows_without_pairs = _count_value(checked, "reason", NO_PAIR)
    bad = checked.filter(_is_bad, input_columns="error", batched=True, desc="finding bad rows")
    if len(bad):
        fatal = bad.filter(_is_fatal, input_columns="reason", batched=True)
        if len(fatal):
            raise DataError(fatal[0]["error"])
        if on_bad_row == "error":
            first_bad = bad[0]
            raise DataError(
                f"{source}: row {first_bad['row']}: {first_bad['error']} (pass on_bad_row=skip to leave such rows out)"
            )
        report.skipped = Counter(bad["reason"])
    if len(bad) or report.rows_without_pairs:
        checked = checked.filter(_is_good, input_columns="reason", batched=True, desc="leaving bad rows out")
    pairs = checked.remove_columns(["error", "reason", "dropped"])
    report.rows_kept = report.rows_read - sum(report.skipped.values()) - report.rows_without_pairs
    report.pairs = len(pairs)
    if not len(pairs):
        raise DataError(f"{source}: no usable rows ({report.summary()})")
    logger.debug(report.summary())  # returned too: the trainer prints it once (it was logged and printed)
    return pairs, report


def release_arrow_memory() -> None:
    """Give back to the system what Arrow's allocator keeps after a conversion.

    Reading a parquet file into the datasets cache decodes one row group at a time; Arrow's pool (mimalloc or
    jemalloc) keeps the freed pages (measured: 0.5 GiB anonymous memory after 100,000 pairs in row groups of 50,000),
    and every ``datasets.map`` worker forked afterwards starts as a copy of it.
    """
    pyarrow.default_memory_pool().release_unused()


def _is_bad(errors: list[str | None]) -> list[bool]:
    return [error is not None for error in errors]


def _is_good(reasons: list[str | None]) -> list[bool]:
    """Pairs: neither a bad row's placeholder nor a ranked row's that gave no pair."""
    return [reason is None for reason in reasons]


def _count_value(dataset: datasets.Dataset, column: str, value: Any) -> int:
    return pyarrow.compute.sum(pyarrow.compute.equal(dataset.with_format("arrow")[column], value)).as_py() or 0


def _is_fatal(reasons: list[str | None]) -> list[bool]:
    return [reason == INVALID_JSON for reason in reasons]


def _detect(raw: datasets.Dataset, json_text: bool, columns: dict[str, str] | None) -> tuple[int, str]:
    """The index of the first row the format can be detected from, and that format (``auto`` if none can be)."""
    for index in range(len(raw)):
        try:
            row = _parse(raw[index], json_text)
        except json.JSONDecodeError:
            continue  # validation names the line, and loading stops there
        if isinstance(row, dict):
            try:
                return index, detect_format(rename_columns(row, columns))
            except RowError:
                pass
    return len(raw), "auto"


def _ranked_kind(raw: datasets.Dataset, json_text: bool, columns: dict[str, str] | None, first: int) -> str:
    """Whether a ranked set's responses are text or messages, from its first row that is a JSON object (text if
    none is: every row is then bad)."""
    for index in range(first, len(raw)):
        try:
            row = _parse(raw[index], json_text)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return response_kind(rename_columns(row, columns))
    return "text"


def _parse(item: dict[str, Any], json_text: bool) -> Any:
    return json.loads(item["json"]) if json_text else item


def _validate_rows(batch: dict[str, list], indices: list[int], *, source: str, data_format: str, kind: str | None,
                   first: int, json_text: bool, hh_as_messages: bool, tokenizer: Any, empty: Any,
                   columns: dict[str, str] | None, pair_rule: str, min_score_gap: float,
                   group_offset: int, ranking: bool = False) -> dict[str, list]:
    """``datasets.map`` function (batched): raw rows -> normalized pairs (a ranked row: its pairs), each with its
    ``row`` and ``group``; for a bad row one record with ``error`` (the message) and ``reason`` (a ``REASONS`` key, or
    ``invalid_json``) beside empty pairs, for a ranked row left with no pair one with ``reason`` :data:`NO_PAIR`.
    ``dropped``: the ranked row's candidate pairs dropped by ``min_score_gap``, on its first record. ``ranking``
    (``data.responses=ranking``): one record per row, with its ``responses`` best first."""
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "row": [], GROUP: [], "error": [],
                            "reason": [], "dropped": []}
    fields = ("prompt", "chosen", "rejected")
    if ranking:
        out[RESPONSES_COLUMN] = []
        fields += (RESPONSES_COLUMN,)

    def emit(index: int, pair: dict[str, Any] | None, error: str | None, reason: str | None, dropped: int) -> None:
        for key in fields:
            out[key].append(([] if key == RESPONSES_COLUMN else empty) if pair is None else pair[key])
        out["row"].append(index)
        out[GROUP].append(group_offset + index)
        out["error"].append(error)
        out["reason"].append(reason)
        out["dropped"].append(dropped)

    columns_in = list(batch)
    for j, index in enumerate(indices):
        try:
            row = json.loads(batch["json"][j]) if json_text else {c: batch[c][j] for c in columns_in}
        except json.JSONDecodeError as decode_error:
            emit(index, None, f"{source}: line {batch['line'][j]}: invalid JSON: {decode_error}", INVALID_JSON, 0)
            continue
        try:
            pairs, dropped = _validate_row(row, index, data_format, kind, first, hh_as_messages, tokenizer, columns,
                                           pair_rule, min_score_gap, ranking)
        except RowError as row_error:
            emit(index, None, str(row_error), row_error.reason, 0)
            continue
        if not pairs:
            emit(index, None, None, NO_PAIR, dropped)
        for n, pair in enumerate(pairs):
            emit(index, pair, None, None, dropped if n == 0 else 0)
    return out


def _validate_row(row: Any, index: int, data_format: str, kind: str | None, first: int, hh_as_messages: bool,
                  tokenizer: Any, columns: dict[str, str] | None, pair_rule: str,
                  min_score_gap: float, ranking: bool = False) -> tuple[list[dict[str, Any]], int]:
    """One raw row's pairs, and how many candidate pairs ``min_score_gap`` dropped (ranked rows); ``ranking``: the
    row as one record with its ``responses`` best first (chosen: the best, rejected: the worst)."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"row should be a JSON object, got {type(row).__name__}")
    row = rename_columns(row, columns)
    if index < first or data_format == "auto":
        detect_format(row)  # raises: this row comes before the first one the format is detected from
    if ranking:
        if data_format == "ranked":
            ranked = normalize_ranked(row, kind)
            ordered = [ranked["responses"][i] for i in ranked_order(ranked)]
            prompt = ranked["prompt"]
        else:
            pair = normalize_row(row, data_format, hh_as_messages=hh_as_messages)
            ordered, prompt = [pair["chosen"], pair["rejected"]], pair["prompt"]
        pairs, dropped = [{"prompt": prompt, "chosen": ordered[0], "rejected": ordered[-1],
                           RESPONSES_COLUMN: ordered}], 0
        if tokenizer is not None and isinstance(prompt, list):
            for response in ordered:  # each response rendered with the prompt, as tokenization renders it
                render_conversation({"prompt": prompt, "chosen": response, "rejected": response}, tokenizer)
        return pairs, dropped
    if data_format == "ranked":
        ranked = normalize_ranked(row, kind)
        made, dropped = ranked_pairs(ranked, pair_rule, min_score_gap)
        responses = ranked["responses"]
        pairs = [{"prompt": ranked["prompt"], "chosen": responses[i], "rejected": responses[j]} for i, j in made]
    else:
        pairs, dropped = [normalize_row(row, data_format, hh_as_messages=hh_as_messages)], 0
    if tokenizer is not None:
        for pair in pairs:
            if isinstance(pair["prompt"], list):
                render_conversation(pair, tokenizer)
    return pairs, dropped


def _raw_rows(source: str, split: str, config_name: str | None, data_dir: str | None,
              revision: str | None) -> tuple[datasets.Dataset, bool]:
    """The source's rows in Arrow, and whether they are JSON text (a JSON file) rather than columns."""
    if os.path.isfile(source):
        given = [f"{k}={v!r}" for k, v in (("config_name", config_name), ("data_dir", data_dir),
                                            ("revision", revision)) if v is not None]
        if given:
            raise DataError(f"{source} is a file: {', '.join(given)} apply to a folder or Hub dataset")
        if source.endswith(JSON_SUFFIXES):
            return _slice_file(_json_rows(source), source, split), True
        if source.endswith(PARQUET_SUFFIXES):
            return _slice_file(datasets.load_dataset("parquet", data_files=source, split="train", **PARQUET_READ),
                               source, split), False
        raise DataError(
            f"{source}: unsupported file type; use one of {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    if source.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES) and not os.path.exists(source):
        raise DataError(f"{source}: no such file")
    read = PARQUET_READ if _parquet_folder(source, data_dir) else {}
    try:
        dataset = datasets.load_dataset(source, name=config_name, data_dir=data_dir, revision=revision, split=split,
                                        **read)
    except Exception as error:  # the Hub and the folder loader raise many kinds
        raise DataError(f"{source}: could not load split {split!r}: {error}") from error
    return dataset, False


# Arrow's parquet scan pre-buffers each row group's column chunks by default, and (pyarrow 24, reading the file
# object datasets passes it) the process kept every one read: converting 1,000,000 pairs (a 2.15 GiB file) into
# the datasets cache peaked at 3.1 GiB of anonymous memory, growing with the file. Without pre-buffering the scan
# reads each column chunk through a buffered stream: a peak of 1.2 GiB, one row group's worth, at the same speed.
PARQUET_READ = {"fragment_scan_options": pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)}


def _parquet_folder(source: str, data_dir: str | None) -> bool:
    """A local folder whose data files are all parquet (read with :data:`PARQUET_READ`)."""
    folder = os.path.join(source, data_dir) if data_dir else source
    if not os.path.isdir(folder):
        return False
    names = [name for _, _, files in os.walk(folder) for name in files if not name.startswith(".")]
    data = [name for name in names if not name.lower().endswith((".md", ".txt", ".yaml", ".yml", ".py"))]
    return bool(data) and all(name.endswith(PARQUET_SUFFIXES) for name in data)


def _slice_file(raw: datasets.Dataset, source: str, split: str) -> datasets.Dataset:
    """A file is one split, ``train``; ``train[:50%]``, ``train[10:20]`` and sums of slices take part of it."""
    if split == "train":
        return raw
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(raw)})
    except (ValueError, AssertionError) as error:
        raise DataError(f"{source} is a file, which has one split, train: give train or a slice of it such as "
                        f"train[:10%] (got split {split!r}: {error})") from None
    if len(instructions) == 1:
        return raw.select(range(instructions[0].from_, instructions[0].to))
    return raw.select([i for part in instructions for i in range(part.from_, part.to)])


def _json_rows(path: str) -> datasets.Dataset:
    """A JSON file's rows as JSON text in a cached Arrow dataset, keyed by the file's path, size and time."""
    stat = os.stat(path)
    try:
        return datasets.Dataset.from_generator(
            _read_json, features=RAW_JSON,
            gen_kwargs={"path": path, "key": f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"},
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):
            raise DataError(str(error.__cause__)) from None
        raise


def _read_json(path: str, key: str) -> Iterator[dict[str, Any]]:
    """JSON lines (one object a line) or one JSON array, optionally gzipped: ``{"json": text, "line": number}``
    per row. A line's JSON is parsed when it is validated; an array is parsed here, whole (errors name the file).
    ``key`` (the file's absolute path, size and modification time) only keys the cache."""
    del key
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
            if not rows:
                raise DataError(f"{path}: no rows (an empty JSON array)")
            for row in rows:
                yield {"json": json.dumps(row), "line": 0}
            return
        if not head:
            raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
        for number, line in enumerate(_prepend(head, handle), start=1):
            if line.strip():
                yield {"json": line, "line": number}


def _prepend(first: str, handle: Any) -> Iterator[str]:
    first_line = first + handle.readline()
    yield first_line
    yield from handle


def take_subset(pairs: datasets.Dataset, num_samples: int | None, seed: int, *,
                key: str = "num_samples") -> datasets.Dataset:
    """A seeded random subset of ``num_samples`` rows: pairs, or where a ranked row gave several pairs (they share a
    ``group``) groups, each with all its pairs. All of them when None or when that many or fewer exist; fewer is
    warned about, naming ``key``, the setting that asked for more: ``data.sources[1].num_samples``."""
    grouped = _grouped(pairs, seed)
    count = len(pairs) if grouped is None else grouped[2]
    if num_samples is None or num_samples >= count:
        if num_samples is not None and num_samples > count:
            what = "pairs" if grouped is None else f"rows (prompts, with {len(pairs)} pairs)"
            logger.warning("%s=%d but only %d %s exist: using all of them", key, num_samples, count, what)
        return pairs
    if num_samples < 1:
        raise DataError(f"num_samples must be at least 1, got {num_samples}")
    if grouped is None:
        return pairs.shuffle(seed=seed).select(range(num_samples))
    order, positions, _ = grouped
    return pairs.select(order[positions < num_samples])


def count_rows(pairs: datasets.Dataset) -> int:
    """The rows ``pairs`` came from: their distinct groups (pairs without a ``group`` column: one row each)."""
    if GROUP not in pairs.column_names:
        return len(pairs)
    return len(pyarrow.compute.unique(pairs.with_format("arrow")[GROUP]))


def _grouped(pairs: datasets.Dataset, seed: int) -> tuple[numpy.ndarray, numpy.ndarray, int] | None:
    """The pairs in a seeded random order of their groups, each group's pairs together: (pair indices in that
    order, each one's group's position in it, the number of groups). None when every pair is its own group (pair
    formats, a ranked set's best_vs_worst): callers then take pairs as they always have, so those sets subset and
    split as before groups existed."""
    if GROUP not in pairs.column_names:
        return None
    groups = pairs.with_format("arrow")[GROUP].to_numpy()
    unique, inverse = numpy.unique(groups, return_inverse=True)
    if len(unique) == len(groups):
        return None
    position = numpy.empty(len(unique), dtype=numpy.int64)
    position[numpy.random.default_rng(seed).permutation(len(unique))] = numpy.arange(len(unique))
    pair_positions = position[inverse]
    order = numpy.argsort(pair_positions, kind="stable")
    return order, pair_positions[order], len(unique)


def split_pairs(
    pairs: datasets.Dataset, *, eval_ratio: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split into train and eval by ratio with a fixed seed; ``eval_ratio=0`` gives no eval split.

    The ratio counts rows: where a ranked row gave several pairs (one ``group``), ``round(groups * eval_ratio)``
    groups go to eval with all their pairs, so no prompt has pairs on both sides."""
    if not 0.0 <= eval_ratio < 1.0:
        raise DataError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0.0:
        return pairs, None
    grouped = _grouped(pairs, seed)
    count = len(pairs) if grouped is None else grouped[2]
    n_eval = max(1, round(count * eval_ratio))
    if n_eval >= count:
        what = "pairs" if grouped is None else f"rows (prompts, with {len(pairs)} pairs)"
        raise DataError(f"eval_ratio={eval_ratio} leaves no training {what.split()[0]} out of {count}"
                        + ("" if grouped is None else f" {what}"))
    if grouped is None:
        parts = pairs.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    order, positions, _ = grouped
    return pairs.select(order[positions >= n_eval]), pairs.select(order[positions < n_eval])


def load_mixture(
    parts: list[Part], *, seed: int, data_format: str = "auto", stopping_strategy: str | None = None,
    **load_kwargs: Any
) -> tuple[datasets.Dataset, list[LoadReport]]:
    """Each part loaded, validated and reported on its own (``LoadReport.part``), cut to its ``num_samples`` /
    ``fraction`` (a seeded subset), then mixed; each pair carries its part's index in a ``part`` column.

    Without weights every pair of every (cut) part is used once, all shuffled together with ``seed``. With weights
    (every part has one; :func:`~dpo_dist.config.check_weights`) the mixture is ``datasets.interleave_datasets``
    over the parts, each shuffled with ``seed`` first (so the pairs a part gives are a seeded random subset of it, not
    its first rows): pair after pair, a part is drawn at random with probability weight / sum of weights (numpy's
    generator seeded by ``seed``), until ``stopping_strategy`` says stop: ``first_exhausted`` (None means it) at the
    first draw of a part that has run out, so no pair repeats and the mixture holds about min(pairs_i / p_i) pairs;
    ``all_exhausted`` once every part has run out once, the parts that ran out earlier starting over (their pairs
    repeat): about max(pairs_i / p_i). A part of weight 0 is loaded and reported, and gives nothing. Each report's
    ``rows_used`` counts what its part gave, repeats included.

    ``fraction`` takes ``round(fraction * kept rows)`` rows (a ranked row with all its pairs), at least one. Parts
    must give the same kind of pairs (all text, or all messages); ``load_kwargs`` go to :func:`load_pairs`. Each
    part's groups follow the previous parts' rows, so a group names one row of the whole mixture.

    A weighted mixture draws pairs, not rows: a ranked row may give some of its pairs only.
    """
    if not parts:
        raise DataError("data.sources is empty: give at least one source")
    try:
        probabilities = check_weights([part.weight for part in parts], stopping_strategy)
    except ConfigError as error:
        raise DataError(str(error)) from None
    loaded, reports, group_offset = [], [], 0
    for index, part in enumerate(parts):
        where = f"data.sources[{index}] ({part.source})"
        try:
            check_source(where, part.source, part.num_samples, part.fraction)
        except ConfigError as error:
            raise DataError(str(error)) from None
        pairs, report = load_pairs(
            part.source, split=part.split, config_name=part.config_name, data_dir=part.data_dir,
            revision=part.revision, data_format=part.data_format or data_format, group_offset=group_offset,
            **load_kwargs,
        )
        group_offset += report.rows_read
        report.part, report.entry = index, f"data.sources[{index}]"
        if part.fraction is not None:  # at most all of them: nothing to warn about
            pairs = take_subset(pairs, max(1, round(part.fraction * count_rows(pairs))), seed)
        elif part.num_samples is not None:
            pairs = take_subset(pairs, part.num_samples, seed, key=f"data.sources[{index}].num_samples")
        if part.fraction is not None or part.num_samples is not None:
            report.rows_subset = len(pairs)
        if loaded and pairs.features != first.features:
            raise DataError(f"{where} gives {_kind(pairs)} pairs ({report.data_format} format) but data.sources[0] "
                            f"gives {_kind(first)} ({reports[0].data_format} format): a mixture needs one kind "
                            "(hh_as_messages turns HH transcripts into messages)")
        first = first if loaded else pairs
        loaded.append(_with_part(pairs, index))
        reports.append(report)
    if probabilities is None:
        for pairs, report in zip(loaded, reports):
            report.rows_used = len(pairs)
        return datasets.concatenate_datasets(loaded).shuffle(seed=seed), reports
    drawn = [i for i, p in enumerate(probabilities) if p > 0]  # a part never drawn from stays out of the draw
    mixed = datasets.interleave_datasets(
        [loaded[i].shuffle(seed=seed) for i in drawn], probabilities=[probabilities[i] for i in drawn], seed=seed,
        stopping_strategy=stopping_strategy or "first_exhausted")
    used = count_parts(mixed)
    for index, report in enumerate(reports):
        report.rows_used, report.probability = used.get(index, 0), probabilities[index]
    return mixed, reports


def _with_part(pairs: datasets.Dataset, index: int) -> datasets.Dataset:
    """``pairs`` with a ``part`` column of ``index``; fingerprinted from theirs (hashing the column itself would take
    seconds for a million pairs)."""
    from datasets.fingerprint import Hasher

    column = pyarrow.array([index] * len(pairs), pyarrow.int64())
    return pairs.add_column(PART, column, new_fingerprint=Hasher.hash([pairs._fingerprint, PART, index]))


def count_parts(pairs: datasets.Dataset | None) -> dict[int, int]:
    """How many of ``pairs`` came from each part of a mixture (by their ``part`` column); empty for None or pairs
    without one."""
    if pairs is None or PART not in pairs.column_names or not len(pairs):
        return {}
    import pyarrow.compute

    counted = pyarrow.compute.value_counts(pairs.with_format("arrow")[PART]).to_pylist()
    return {row["values"]: row["counts"] for row in counted}


def _kind(pairs: datasets.Dataset) -> str:
    return "message-list" if pairs.features["prompt"] == MESSAGES else "text"


def check_rank_counts(counts_by_rank: list[Any]) -> None:
    """Every process must have prepared the same pairs (on nodes without a shared disk each node loads its own copy);
    ``counts_by_rank[r]`` is rank r's counts (any comparable value: ``{"train_pairs": 65, "eval_pairs": 16}``).
    A DataError naming each rank's counts otherwise."""
    if any(counts != counts_by_rank[0] for counts in counts_by_rank[1:]):
        listed = "; ".join(f"rank {rank}: {counts}" for rank, counts in enumerate(counts_by_rank))
        raise DataError(f"the processes prepared different data ({listed}): every node must read the same data "
                        "(the same files and revision); a node without a shared disk loads its own copy")


def load_train_eval(
    source: str | list[Part],
    *,
    split: str = "train",
    config_name: str | None = None,
    data_dir: str | None = None,
    revision: str | None = None,
    eval_source: str | None = None,
    eval_split: str | None = None,
    eval_ratio: float = 0.0,
    num_samples: int | None = None,
    seed: int = 42,
    stopping_strategy: str | None = None,
    **load_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[LoadReport]]:
    """Train and eval pairs: a given eval file or split when named, else a seeded split by ``eval_ratio``.

    ``source`` is one source (``split``, ``config_name``, ``data_dir``, ``revision`` apply to it, and to its eval
    split) or a mixture (a list of :class:`Part`, see :func:`load_mixture`; ``stopping_strategy`` is a weighted
    one's). ``num_samples`` takes a seeded subset of the training rows first (:func:`take_subset`: a ranked row with
    all its pairs; before a ratio split, so eval comes out of the same subset); a given eval set is used whole, its
    groups numbered after the training sources' rows. ``load_kwargs`` go to :func:`load_pairs`.
    """
    hub = {"config_name": config_name, "data_dir": data_dir, "revision": revision}
    weights = [part.weight for part in source] if isinstance(source, list) else []
    try:  # before anything is loaded
        check_weights(weights, stopping_strategy, eval_ratio if eval_source is None and eval_split is None else 0.0)
    except ConfigError as error:
        raise DataError(str(error)) from None
    if isinstance(source, list):
        try:  # with an eval source, eval_split names that source's split
            check_mixture_keys({**hub, "eval_split": eval_split if eval_source is None else None})
        except ConfigError as error:
            raise DataError(str(error)) from None
        pairs, reports = load_mixture(source, seed=seed, stopping_strategy=stopping_strategy, **load_kwargs)
    else:
        pairs, report = load_pairs(source, split=split, **hub, **load_kwargs)
        reports = [report]
    pairs = take_subset(pairs, num_samples, seed, key="data.num_samples")
    if eval_source is None and eval_split is None:
        train, eval_ = split_pairs(pairs, eval_ratio=eval_ratio, seed=seed)
        return train, eval_, reports
    if eval_ratio:
        raise DataError("give either eval_ratio or an eval file/split, not both")
    if eval_source is None and os.path.isfile(source):
        raise DataError(f"{source} is a file, which has no splits: an eval split names a split of a dataset folder or "
                        "Hub dataset; for a file give a separate eval file (data.eval_source) or data.eval_ratio")
    after = sum(report.rows_read for report in reports)  # the eval set's groups follow the training rows'
    if eval_source is None:
        eval_, eval_report = load_pairs(source, split=eval_split, **hub, group_offset=after, **load_kwargs)
        eval_report.entry = "data.eval_split"
    else:
        eval_split = eval_split or ("train" if isinstance(source, list) else split)
        eval_, eval_report = load_pairs(eval_source, split=eval_split, group_offset=after, **load_kwargs)
        eval_report.entry = "data.eval_source"
    return pairs, eval_, [*reports, eval_report]


EVAL_ENTRIES = ("data.eval_source", "data.eval_split")  # a report of these gave the eval pairs, all of them


def source_counts(reports: list[LoadReport], train: datasets.Dataset, eval_: datasets.Dataset | None,
                  train_tok: datasets.Dataset, eval_tok: datasets.Dataset | None) -> list[dict[str, Any]]:
    """What each source gave, one record per report of :func:`load_train_eval` (``reports``), from its pairs
    (``train``, ``eval_``) to the tokenized ones (``train_tok``, ``eval_tok``): ``rows_read``, ``skipped`` (by reason),
    ``kept``; a mixture entry's ``subset`` (its num_samples / fraction) and ``probability`` (its normalized weight)
    where it has them; ``used``: what it put into the pairs (a mixture's entry: as its report says, a weighted one's
    repeats counted; one source: its kept pairs), which then went to ``train_pairs``, ``eval_pairs``,
    ``dropped_too_long`` (prompt too long, at tokenization) or were ``left_out_by_num_samples`` (``data.num_samples``
    on the whole). A ranked source's record adds ``pairs`` (its kept rows' pairs, before any subset),
    ``pairs_below_gap`` and ``rows_without_pairs`` (:class:`LoadReport`). A mixture's pairs are told apart by their
    ``part`` column; an eval source's are all its own."""
    eval_owner = next((i for i, r in enumerate(reports) if r.entry in EVAL_ENTRIES), 0)

    def owners(pairs: datasets.Dataset | None, owner: int) -> dict[int, int]:
        if pairs is None or PART in pairs.column_names:
            return count_parts(pairs)  # a part's index is its report's
        return {owner: len(pairs)}

    split = [owners(train, 0), owners(eval_, eval_owner)]
    tokenized = [owners(train_tok, 0), owners(eval_tok, eval_owner)]
    records = []
    for i, report in enumerate(reports):
        record: dict[str, Any] = {"entry": report.entry, "source": report.source, "split": report.split,
                                  "rows_read": report.rows_read, "skipped": dict(sorted(report.skipped.items())),
                                  "kept": report.rows_kept}
        if report.pair_rule is not None:
            record.update(rows_without_pairs=report.rows_without_pairs, pairs=report.pairs,
                          pairs_below_gap=report.pairs_below_gap)
        if report.rows_subset is not None:
            record["subset"] = report.rows_subset
        if report.probability is not None:
            record["probability"] = report.probability
        used = report.rows_used if report.rows_used is not None else report.pairs
        into_splits = split[0].get(i, 0) + split[1].get(i, 0)
        record.update(used=used, left_out_by_num_samples=used - into_splits, train_pairs=tokenized[0].get(i, 0),
                      eval_pairs=tokenized[1].get(i, 0),
                      dropped_too_long=into_splits - tokenized[0].get(i, 0) - tokenized[1].get(i, 0))
        records.append(record)
    return records


def data_source(cfg: Config) -> str | list[Part]:
    """``data.source``, or the mixture ``data.sources`` as :class:`Part` entries."""
    if not cfg.data.sources:
        return cfg.data.source
    return [Part(e.source, split=e.split, config_name=e.config_name, data_dir=e.data_dir, revision=e.revision,
                 num_samples=e.num_samples, fraction=e.fraction, data_format=e.format, weight=e.weight)
            for e in cfg.data.sources]


def load_configured_pairs(cfg: Config, tokenizer: Any, *, sentiment: tuple[str, str] | None = None
                          ) -> tuple[datasets.Dataset, datasets.Dataset | None, list[LoadReport]]:
    """Train and eval pairs as ``cfg.data`` says (:func:`load_train_eval` with its settings; a given eval set wins over
    ``data.eval_ratio``), in this process, and what each source gave. The built-in sentiment set is read from
    ``sentiment``, its (train, eval) files, which ``dpo_dist.data.sentiment.ensure_sentiment_data`` builds."""
    d = cfg.data
    source, eval_source = data_source(cfg), d.eval_source
    eval_ratio = 0.0 if d.eval_source is not None or d.eval_split is not None else d.eval_ratio  # a given eval set wins
    if source == SENTIMENT:
        if sentiment is None:
            raise ValueError(f"{SENTIMENT} is read from its built files: pass sentiment=(train file, eval file)")
        (source, eval_source), eval_ratio = sentiment, 0.0
    hub = {"config_name": d.config_name, "data_dir": d.data_dir, "revision": d.revision}
    hub = hub if isinstance(source, str) else {}
    train, eval_, reports = load_train_eval(
        source, split=d.split, **hub, eval_source=eval_source, eval_split=d.eval_split, eval_ratio=eval_ratio,
        num_samples=d.num_samples, seed=cfg.train.seed, stopping_strategy=d.stopping_strategy,
        data_format=d.data_format, on_bad_row=d.on_bad_row,
        hh_as_messages=d.hh_as_messages, tokenizer=tokenizer, num_proc=d.num_proc,
        columns=dataclasses.asdict(d.columns), pair_rule=d.pair_rule, min_score_gap=d.min_score_gap,
        responses=d.responses,
    )
    if sentiment is not None and data_source(cfg) == SENTIMENT:
        for report in reports:  # both files are the built-in set's, which data.source names
            report.entry = "data.source"
    return train, eval_, reports
