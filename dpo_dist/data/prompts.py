"""The prompts of iterative DPO rounds (``rounds.count > 1``): training prompts, whose completions each round samples
from the policy, and held-out prompts, on which each round is evaluated; read from ``cfg.data`` by the data stage's
own readers.

    prompts = load_prompts(cfg)            # RoundPrompts: .train, .held_out, what was dropped, .lines for the log
    for line in prompts.lines:
        logger.info(line)

Where they come from:

- The built-in sentiment set (``data.source: builtin:sentiment``, the default, with no ``data.sources``): its prompts
  as the built-in set splits them (:func:`dpo_dist.data.sentiment.chosen_prompts`).
- Any other source the data stage reads (a file, a folder, a Hub dataset; or each entry of a ``data.sources``
  mixture with its split, config_name, data_dir, revision, num_samples or fraction), opened by ``load.py``'s reader.
  A row without ``chosen`` or ``completions`` is a prompt-only row: its ``prompt`` field (``data.columns.prompt``)
  is the prompt, a string or a list of ``{role, content}`` messages. A pair or ranked row (any ``data.data_format``)
  gives the prompt that ``formats.py`` normalizes it to (an HH transcript: the text up to its last Assistant turn;
  whole conversations: their shared leading messages), so such a row is bad exactly where training on it would be.
  A source's prompts are all strings or all message lists (the first one's kind), like a dataset's pairs.

A prompt seen again (the same text or messages, from any source) is kept once, its first occurrence, and counted.
``data.num_samples`` takes a seeded subset of the distinct prompts (``load.take_subset``), a mixture entry's
``num_samples`` / ``fraction`` a seeded subset of that entry's, as the pair loader takes rows. Held-out prompts:
``data.eval_source`` / ``data.eval_split`` when given (their prompts, all of them), else a seeded split of
``data.eval_ratio`` of the distinct prompts (``load.split_pairs``: at least one when the ratio is above 0); a
training prompt that is also held out is removed from training and counted. A bad row (no prompt, an empty or
wrong-typed one, or a pair row the data stage rejects) stops loading with a :class:`DataError` naming the source and
row, or with ``data.on_bad_row=skip`` is left out and counted by reason (``LoadReport.skipped``).

What the config refuses for rounds is refused there, before anything loads (``Config.check_rounds``): no held-out
prompts, a weighted mixture.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Union

import datasets

from dpo_dist.config import Config
from dpo_dist.data.formats import (RowError, _field, _message_list, detect_format, normalize_ranked, normalize_row,
                                   rename_columns, response_kind)
from dpo_dist.data.load import DataError, LoadReport, Part, _raw_rows, data_source, split_pairs, take_subset
from dpo_dist.data.sentiment import chosen_prompts

Prompt = Union[str, list]  # a string, or a list of {"role", "content"} messages
PROMPT_ONLY = "prompt"  # the format of rows that hold a prompt and no responses (LoadReport.data_format)


@dataclass(frozen=True)
class RoundPrompts:
    """Training and held-out prompts for iterative rounds, what was dropped on the way, and where they came from.

    ``duplicates``: prompts seen again after their first occurrence (in one source or across sources), dropped;
    ``overlaps``: training prompts dropped because a held-out prompt is the same; ``left_out``: distinct prompts
    that ``num_samples`` / ``fraction`` did not take; ``skipped``: bad rows left out (``data.on_bad_row=skip``), all
    sources together, by reason; ``reports``: each source's :class:`~dpo_dist.data.load.LoadReport` (none for the
    built-in set); ``lines``: one line per source and one for the split, for the log."""

    train: list
    held_out: list
    duplicates: int = 0
    overlaps: int = 0
    left_out: int = 0
    skipped: dict = field(default_factory=dict)
    reports: tuple = ()
    lines: tuple = ()


def load_prompts(cfg: Config) -> RoundPrompts:
    """The training and held-out prompts ``cfg.data`` gives (see the module docstring)."""
    d = cfg.data
    if d.uses_sentiment():
        return _sentiment_prompts(cfg)
    source = data_source(cfg)
    mixture = isinstance(source, list)
    parts = source if mixture else [
        Part(source, split=d.split, config_name=d.config_name, data_dir=d.data_dir, revision=d.revision)]
    given_eval = d.eval_source is not None or d.eval_split is not None
    seed, reports, lines = cfg.train.seed, [], []
    seen: dict[str, int] = {}  # a prompt's key -> its part
    train: list[Prompt] = []
    duplicates = left_out = 0
    for index, part in enumerate(parts):
        entry = f"data.sources[{index}]" if mixture else "data.source"
        prompts, report, repeated = read_prompts(cfg, part, entry=entry, part_index=index if mixture else None)
        reports.append(report)
        if train and _is_messages(prompts[0]) != _is_messages(train[0]):
            raise DataError(f"data.sources[{index}] ({part.source}) gives {_kind(prompts[0])} prompts but the entries "
                            f"before it give {_kind(train[0])}: rounds need one kind (data.hh_as_messages turns HH "
                            "transcripts into messages)")
        distinct = len(prompts)
        if part.fraction is not None:
            prompts = _subset(prompts, max(1, round(part.fraction * len(prompts))), seed)
        elif part.num_samples is not None:
            prompts = _subset(prompts, part.num_samples, seed)
        left_out += distinct - len(prompts)
        kept = [prompt for prompt in prompts if seen.setdefault(_key(prompt), index) == index]
        again = len(prompts) - len(kept)  # already given by an earlier entry
        duplicates += repeated + again
        train += kept
        lines.append(_source_line(report, distinct, repeated, len(prompts), again))
    if d.num_samples is not None:
        taken = _subset(train, d.num_samples, seed)
        left_out += len(train) - len(taken)
        train = taken
    if given_eval:
        held_out, report, repeated, where = _given_held_out(cfg)
        reports.append(report)
        if _is_messages(held_out[0]) != _is_messages(train[0]):
            raise DataError(f"{where} ({report.source}) gives {_kind(held_out[0])} prompts but the training prompts "
                            f"are {_kind(train[0])}: rounds need one kind")
        duplicates += repeated
        lines.append(_source_line(report, len(held_out), repeated, len(held_out), 0))
        held = {_key(prompt) for prompt in held_out}
        before = len(train)
        train = [prompt for prompt in train if _key(prompt) not in held]
        overlaps, how = before - len(train), f"from {where}"
        if not train:
            raise DataError(f"every training prompt ({before}) is also a held-out prompt of {where} "
                            f"({report.source}): held-out prompts must differ from the training prompts")
    else:
        train, held_out = _ratio_split(train, d.eval_ratio, seed)
        overlaps, how = 0, f"by data.eval_ratio={d.eval_ratio:g} (seed {seed})"
    skipped = sum((Counter(report.skipped) for report in reports), Counter())
    dropped = [f"{n} {what}" for n, what in ((duplicates, "duplicates dropped"),
                                             (overlaps, "training prompts also held out removed"),
                                             (left_out, "left out by num_samples / fraction")) if n]
    lines.append(f"round prompts: {len(train)} training, {len(held_out)} held out {how}"
                 + (f"; {', '.join(dropped)}" if dropped else ""))
    return RoundPrompts(train=train, held_out=held_out, duplicates=duplicates, overlaps=overlaps, left_out=left_out,
                        skipped=dict(sorted(skipped.items())), reports=tuple(reports), lines=tuple(lines))


def read_prompts(cfg: Config, part: Part, *, entry: str = "data.source", part_index: int | None = None
                 ) -> tuple[list[Prompt], LoadReport, int]:
    """One source's distinct prompts in the order of their first row, its report (rows read, kept, skipped), and
    how many repeated prompts were dropped. The source is opened by the data stage's reader (``load._raw_rows``:
    files, slices of a file, folders, the Hub); ``cfg.data`` gives the columns, the format (``part.data_format``
    first), ``hh_as_messages`` and ``on_bad_row``."""
    d = cfg.data
    data_format = part.data_format or d.data_format
    raw, json_text = _raw_rows(part.source, part.split, part.config_name, part.data_dir, part.revision)
    report = LoadReport(source=part.source, data_format=data_format, split=part.split, rows_read=len(raw),
                        entry=entry, part=part_index)
    columns = asdict(d.columns)
    prompts: dict[str, Prompt] = {}
    kind, first_kind, repeated = None, None, 0
    for index, item in enumerate(_rows(raw)):
        try:
            row = json.loads(item["json"]) if json_text else item
        except json.JSONDecodeError as error:  # not a bad row: a file that is not JSON stops loading, as load.py's
            raise DataError(f"{part.source}: line {item['line']}: invalid JSON: {error}") from None
        try:
            if not isinstance(row, dict):
                raise RowError("wrong_type", f"row should be a JSON object, got {type(row).__name__}")
            row = rename_columns(row, columns)
            fmt = report.data_format if report.data_format != "auto" else _detect(row)
            if fmt == "ranked" and kind is None:
                kind = response_kind(row)
            prompt = row_prompt(row, fmt, kind, hh_as_messages=d.hh_as_messages)
            if first_kind is not None and _is_messages(prompt) != first_kind:
                raise RowError("wrong_type", f"the prompt is {_kind(prompt)}, but this source's first prompt is "
                                             f"{'message-list' if first_kind else 'text'}: a source's prompts are "
                                             "of one kind")
        except RowError as error:
            if d.on_bad_row == "error":
                raise DataError(f"{part.source}: row {index}: {error} (set data.on_bad_row=skip to leave such rows "
                                "out)") from None
            report.skipped[error.reason] += 1
            continue
        report.data_format = fmt  # the first good row's format holds for the rest, as the pair loader detects it
        first_kind = _is_messages(prompt)
        key = _key(prompt)
        if key in prompts:
            repeated += 1
        else:
            prompts[key] = prompt
    report.rows_kept = report.rows_read - sum(report.skipped.values())
    if not prompts:
        raise DataError(f"{part.source}: no usable rows ({report.summary()})")
    return list(prompts.values()), report, repeated


def _rows(raw: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """The rows as Python dicts, converted a thousand at a time (a dataset's own row iteration formats each row
    alone: several times slower on a large set)."""
    for batch in raw.with_format("arrow").iter(batch_size=1000):
        yield from batch.to_pylist()


def row_prompt(row: dict[str, Any], data_format: str, kind: str | None = None, *,
               hh_as_messages: bool = False) -> Prompt:
    """A row's prompt (its fields named as ours: ``formats.rename_columns``): a prompt-only row's ``prompt`` field
    (``data_format`` :data:`PROMPT_ONLY`), else the prompt that ``formats.py`` normalizes the pair or ranked row to.
    A :class:`~dpo_dist.data.formats.RowError` for a missing, wrong-typed or empty prompt, or a pair row the data
    stage rejects."""
    if data_format == PROMPT_ONLY:
        prompt = _field(row, "prompt", (str, list))
        if isinstance(prompt, list):
            prompt = _message_list(prompt, "prompt")
    elif data_format == "ranked":
        prompt = normalize_ranked(row, kind or response_kind(row))["prompt"]
    else:
        prompt = normalize_row(row, data_format, hh_as_messages=hh_as_messages)["prompt"]
    if isinstance(prompt, str) and not prompt.strip():
        raise RowError("no_prompt", "the prompt is empty")
    if isinstance(prompt, list) and not any(message["content"].strip() for message in prompt):
        raise RowError("no_prompt", "the prompt messages are empty" if prompt else "the prompt message list is empty")
    return prompt


def _detect(row: dict[str, Any]) -> str:
    """A row's format: a pair or ranked row's (``formats.detect_format``), or :data:`PROMPT_ONLY` for a row with a
    prompt and no ``chosen`` or ``completions``."""
    if "chosen" in row or "completions" in row or "prompt" not in row:
        try:
            return detect_format(row)
        except RowError:
            raise RowError("missing_field", f"no 'prompt' field, nor a pair's 'chosen' or a ranked row's "
                                            f"'completions' (fields: {sorted(row)}; data.columns.prompt names the "
                                            "prompt's field)") from None
    return PROMPT_ONLY


def _given_held_out(cfg: Config) -> tuple[list[Prompt], LoadReport, int, str]:
    """The held-out prompts of ``data.eval_source`` or ``data.eval_split`` (the splits as the pair loader takes
    them: ``load.load_train_eval``), their report, repeats dropped, and the entry that gave them."""
    d = cfg.data
    if d.eval_source is not None:
        split = d.eval_split or ("train" if d.sources else d.split)
        part, where = Part(d.eval_source, split=split), "data.eval_source"
    else:
        if os.path.isfile(d.source):
            raise DataError(f"{d.source} is a file, which has no splits: an eval split names a split of a dataset "
                            "folder or Hub dataset; for a file give a separate eval file (data.eval_source) or "
                            "data.eval_ratio")
        part, where = Part(d.source, split=d.eval_split, config_name=d.config_name, data_dir=d.data_dir,
                           revision=d.revision), "data.eval_split"
    prompts, report, repeated = read_prompts(cfg, part, entry=where)
    return prompts, report, repeated, where


def _ratio_split(prompts: list[Prompt], eval_ratio: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """``eval_ratio`` of the distinct prompts held out, a seeded split as the pair loader's (``load.split_pairs``)."""
    if max(1, round(len(prompts) * eval_ratio)) >= len(prompts):
        raise DataError(f"data.eval_ratio={eval_ratio:g} of {len(prompts)} distinct prompts leaves no training "
                        "prompt: give more prompts, a smaller data.eval_ratio, or data.eval_source")
    train, held_out = split_pairs(_as_dataset(prompts), eval_ratio=eval_ratio, seed=seed)
    return [prompts[i] for i in train["index"]], [prompts[i] for i in held_out["index"]]


def _subset(prompts: list[Prompt], num_samples: int, seed: int) -> list[Prompt]:
    """A seeded subset of ``num_samples`` prompts, as the pair loader takes one (``load.take_subset``), in their
    order; all of them when there are no more."""
    if num_samples >= len(prompts):
        return prompts
    taken = take_subset(_as_dataset(prompts), num_samples, seed)["index"]
    return [prompts[i] for i in sorted(taken)]


def _as_dataset(prompts: list[Prompt]) -> datasets.Dataset:
    """The prompts' indices as a dataset, for the pair loader's seeded subsets and splits (which take rows, whatever
    they hold)."""
    return datasets.Dataset.from_dict({"index": list(range(len(prompts)))})


def _key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _is_messages(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def _kind(prompt: Prompt) -> str:
    return "message-list" if _is_messages(prompt) else "text"


def _source_line(report: LoadReport, distinct: int, repeated: int, taken: int, again: int) -> str:
    text = f"{report.entry} {report.summary().removeprefix(f'data.sources[{report.part}] ')}; {distinct} prompts"
    if repeated:
        text += f" ({repeated} repeats dropped)"
    if taken != distinct:
        text += f", {taken} in its subset"
    if again:
        text += f", {again} given by an earlier entry"
    return text


def _sentiment_prompts(cfg: Config) -> RoundPrompts:
    settings = cfg.data.sentiment
    train, held_out = chosen_prompts(settings)
    line = (f"round prompts: {len(train)} training, {len(held_out)} held out, the built-in sentiment set's "
            f"(data.sentiment.num_prompts={settings.num_prompts}, eval_prompts={settings.eval_prompts}, "
            f"seed {settings.seed})")
    return RoundPrompts(train=list(train), held_out=list(held_out), skipped={}, lines=(line,))
