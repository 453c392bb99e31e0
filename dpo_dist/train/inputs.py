"""From config to tokenized train and eval pairs, with reference log-probs attached when they are precomputed."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import datasets
import torch

from dpo_dist.config import SENTIMENT, Config
from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.data.load import (DataError, auto_num_proc, check_rank_counts, data_source, load_configured_pairs,
                                source_counts)
from dpo_dist.data.sentiment import ensure_sentiment_data
from dpo_dist.data.tokenization import Truncation, tokenize_pairs
from dpo_dist.distributed import say
from dpo_dist.model.builtin import cache_root
from dpo_dist.train import reference_cache as cache
from dpo_dist.train.reference import (ReferenceScorer, precompute_reference, reference_fingerprint_parts,
                                      scoring_identity)


def model_identity(cfg: Config, source: str, dtype: str, accelerator: Any) -> dict | None:
    """:func:`keyed_identity`, on the main process only: hashing a large checkpoint on every rank would read it N
    times."""
    return keyed_identity(cfg, source, dtype) if accelerator.is_main_process else None


def keyed_identity(cfg: Config, source: str, dtype: str) -> dict | None:
    """The digest of the model's weight files where something is keyed by it (the reference cache, the built-in
    sentiment set), else None."""
    if cfg.reference.mode != "precomputed" and not cfg.data.uses_sentiment():
        return None
    return cache.model_identity(source, revision=cfg.model.revision, dtype=dtype, quantization=cfg.model.quantization)


@contextlib.contextmanager
def sampling_model(cfg: Config, accelerator: Any, model: Any) -> Iterator[Callable[[], Any]]:
    """What the main process samples the built-in set from, by itself: the policy, or under ZeRO-3 with
    ``zero3_init_flag`` (a partitioned model: every forward is a collective) an unsharded copy (one full copy in
    memory while it samples, loaded only when the set is not cached yet).

    Inside, transformers does not see the DeepSpeed config: ``from_pretrained`` would build the copy partitioned
    (``zero.Init``) and ``generate`` would sync every token with the other ranks (``synced_gpus``), which are waiting
    elsewhere; both are collectives this process would run alone."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield lambda: model
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    from dpo_dist.model.load import load_base, resolve_dtype, resolve_source

    def unsharded_copy() -> Any:
        copy = load_base(resolve_source(cfg.model.name_or_path), cfg, resolve_dtype(cfg.model.dtype, accelerator.device),
                         accelerator.device)
        return copy.to(accelerator.device)

    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield unsharded_copy
    finally:
        if getattr(plugin, "dschf", None) is not None:
            set_hf_deepspeed_config(plugin.dschf)


def load_pairs_for(cfg: Config, accelerator: Any, model: Any, tokenizer: Any, identity: dict,
                   stop_check: Callable[[], None] | None = None):
    """Train and eval pairs as in ``cfg.data``; the built-in sentiment set is built first (main process) if needed.

    Each node's local main process loads first (it writes the datasets cache), then the node's other processes read
    that cache, so nodes without a shared disk each prepare their own copy."""
    paths = None
    if data_source(cfg) == SENTIMENT:
        if accelerator.is_main_process:
            with sampling_model(cfg, accelerator, model) as sampler:
                paths = ensure_sentiment_data(sampler, tokenizer, cfg.data.sentiment, identity, accelerator.device,
                                              cache_root(), stop_check, shown=cfg.train.progress_bar)
        from accelerate.utils import broadcast_object_list

        paths = broadcast_object_list([paths])[0]
    with accelerator.local_main_process_first():
        train, eval_, reports = load_configured_pairs(cfg, tokenizer, sentiment=paths)
    for report in reports:
        say(accelerator, report.summary())
    return train, eval_, reports


def tokenized_pairs(
    cfg: Config, accelerator: Any, model: Any, tokenizer: Any, identity: dict,
    stop_check: Callable[[], None] | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """Tokenized train and eval pairs, and counts of what was kept and dropped, in all and per source (``sources``:
    :func:`~dpo_dist.data.load.source_counts`); every process must hold the same counts (a DataError naming each
    rank's otherwise). ``stop_check``: called while the built-in set is sampled; it raises to stop (a stop signal)."""
    truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
    train, eval_, reports = load_pairs_for(cfg, accelerator, model, tokenizer, identity, stop_check)
    with accelerator.local_main_process_first():  # cached per node, like loading
        train_tok, train_dropped = tokenize_pairs(train, tokenizer, truncation,
                                                  num_proc=auto_num_proc(cfg.data.num_proc, len(train)))
        eval_tok, eval_dropped = (tokenize_pairs(eval_, tokenizer, truncation,
                                                 num_proc=auto_num_proc(cfg.data.num_proc, len(eval_)))
                                  if eval_ is not None else (None, 0))
    for name, tokenized in (("training", train_tok), ("eval", eval_tok)):
        if tokenized is not None and len(tokenized) == 0:
            raise DataError(f"every {name} pair was dropped: its prompt leaves no room for a response within "
                            f"data.max_length={cfg.data.max_length}; raise it or set data.max_prompt_length")
    counts = {"train_pairs": len(train_tok), "eval_pairs": len(eval_tok) if eval_tok is not None else 0,
              "dropped_too_long": train_dropped + eval_dropped,
              "sources": source_counts(reports, train, eval_, train_tok, eval_tok)}
    agree_on_counts(counts)
    return train_tok, eval_tok, counts


def said_counts(counts: dict) -> list[str]:
    """The log's lines for :func:`tokenized_pairs`' counts: the totals, and for a mixture where each entry's pairs
    went (each source's loading was reported as it loaded)."""
    lines = [f"pairs: { {key: value for key, value in counts.items() if key != 'sources'} }"]
    if any(record["entry"].startswith("data.sources[") for record in counts["sources"]):
        for record in counts["sources"]:
            went = [f"{record['train_pairs']} train", f"{record['eval_pairs']} eval"]
            went += [f"{record['dropped_too_long']} dropped (too long)"] if record["dropped_too_long"] else []
            went += ([f"{record['left_out_by_num_samples']} left out by data.num_samples"]
                     if record["left_out_by_num_samples"] else [])
            lines.append(f"  {record['entry']} {record['source']}: {record['used']} used: {', '.join(went)}")
    return lines


def agree_on_counts(counts: dict) -> None:
    """Every process's pair counts gathered and compared (:func:`dpo_dist.data.load.check_rank_counts`); on one
    process a no-op."""
    from accelerate.utils import gather_object

    check_rank_counts(gather_object([counts]))


def attach_reference(
    cfg: Config, accelerator: Any, model: Any, tokenizer: Any, identity: dict, *tokenized_sets: datasets.Dataset | None,
    collator: Any = None, stop_check: Any = None, autocast: torch.dtype | None = None, start: Any = None,
) -> list[datasets.Dataset | None]:
    """Each set with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns (from the cache, or computed by every
    process with ``model`` as the reference: call it after ``accelerator.prepare``, so ZeRO-3 shards serve it and
    the forward runs under the policy's autocast), batched by ``collator`` (the training collator, so reference and
    policy are scored the same way). ``autocast``: the dtype the forward is autocast to, part of the cache key
    (:func:`dpo_dist.train.reference.scoring_identity`). ``start``: a PiSSA/OLoRA policy's
    :class:`~dpo_dist.model.adapters.Start` (main process), whose digest keys the log-probs of its starting model."""
    truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
    if start is not None:
        identity = {**identity, "starting_model": start.digest}
    collator = collator or PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    cache_dir = cfg.reference.cache_dir or cache.default_cache_dir()
    scoring = scoring_identity(model, collator, chunk_size=cfg.train.logps_chunk_size,
                               mixed_precision=str(autocast).removeprefix("torch.") if autocast else "no",
                               device_type=accelerator.device.type, ld_alpha=cfg.loss.ld_alpha)
    scorer = ReferenceScorer(model, collator, accelerator, batch_size=cfg.train.eval_batch_size,
                             chunk_size=cfg.train.logps_chunk_size, stop_check=stop_check, ld_alpha=cfg.loss.ld_alpha,
                             show_progress=cfg.train.progress_bar)
    out = []
    for tokenized in tokenized_sets:
        if tokenized is not None:
            parts = (reference_fingerprint_parts(identity, tokenizer, truncation, tokenized, scoring)
                     if accelerator.is_main_process else None)  # hashed once, by the process that reads the cache
            tokenized = precompute_reference(scorer, tokenized, fingerprint_parts=parts, cache_dir=cache_dir)
        out.append(tokenized)
    return out
