"""Reference log-probs: precomputed once and cached on disk, computed online every step, or none.

``reference.mode`` picks one:

- ``precomputed``: before training, the frozen reference scores every pair once (for LoRA: the policy with its
  adapters disabled, so one model is held; for full fine-tuning: the initial weights). Pairs are sharded across
  processes and gathered back in order; the result is cached on disk (``reference_cache.py``) and reused by any later run with
  the same fingerprint without a reference forward.
- ``online``: the reference forward runs on every batch (``online_reference_logps``).
- ``none``: reference-free losses (the reference log-probs are taken as 0, or the loss ignores them, as SimPO).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import datasets
import pyarrow.compute
import torch

from dpo_dist.data.collate import GROUP_COLUMN, GROUP_REFERENCE_COLUMN, REFERENCE_COLUMNS
from dpo_dist.data.packing import PackedPairCollator
from dpo_dist.data.tokenization import GROUP, GROUP_COLUMNS, PAIR_COLUMNS, Truncation
from dpo_dist.distributed import gather_in_order, shard_indices
from dpo_dist.model.adapters import reference_adapters_off
from dpo_dist.model.attention import base_model
from dpo_dist.progress import progress
from dpo_dist.train import reference_cache as cache
from dpo_dist.train.disk import DiskFullError
from dpo_dist.train.logprobs import DEFAULT_CHUNK_SIZE, PairLogps, group_logps, pair_logps
from dpo_dist.train.loss import length_desensitized_logps

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("precomputed", "online", "none")


@contextlib.contextmanager
def as_reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model as the frozen reference: eval mode, no grad, and LoRA adapters disabled if it has them, unless their
    initialization moved part of the base into them (PiSSA, OLoRA: then the policy as initialized is the starting
    model, and this is called only at step 0; :func:`dpo_dist.model.adapters.reference_adapters_off`)."""
    base = getattr(model, "module", model)  # DDP wraps the model in .module
    adapters_off = base.disable_adapter() if reference_adapters_off(base) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapters_off:
            yield model
    finally:
        model.train(was_training)


def online_reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> PairLogps:
    """The reference's log-probs for one collated batch (a frozen copy, or the policy with adapters off)."""
    with as_reference(model):
        return pair_logps(model, batch, **kwargs)


def reference_group_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Every response's reference log-prob of a batch of groups (rankings), summed over its tokens, 0 past a group's
    k. Shape: (G, K)."""
    with as_reference(model):
        return group_logps(model, batch, **kwargs).logps


def batch_reference_group_logps(mode: str, model: torch.nn.Module | None, batch: dict[str, torch.Tensor],
                                **kwargs: Any) -> torch.Tensor | None:
    """:func:`batch_reference_logps` for a batch of groups: ``ref_responses_logps`` (G, K) under ``mode``; None for
    ``none``."""
    if mode == "precomputed":
        if GROUP_REFERENCE_COLUMN not in batch:
            raise KeyError(f"reference mode 'precomputed' but the batch has no {GROUP_REFERENCE_COLUMN}: run "
                           "precompute_reference first")
        return batch[GROUP_REFERENCE_COLUMN]
    if mode == "online":
        if model is None:
            raise ValueError("reference mode 'online' needs a reference model")
        return reference_group_logps(model, batch, **kwargs)
    if mode == "none":
        return None
    raise ValueError(f"reference mode {mode!r} is not one of {REFERENCE_MODES}")


def is_grouped(tokenized: datasets.Dataset) -> bool:
    """Whether a tokenized set holds groups (rankings: ``responses_input_ids``) rather than pairs."""
    return GROUP_COLUMN in tokenized.column_names


def largest_group(tokenized: datasets.Dataset) -> int:
    """The most responses of one example of a tokenized set of groups: the width of its reference log-probs."""
    lengths = pyarrow.compute.list_value_length(tokenized.with_format("arrow")[GROUP_COLUMN])
    return int(pyarrow.compute.max(lengths).as_py())


def reference_pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, ld_alpha: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` reference log-probs of one batch, summed over response tokens, or with ``ld_alpha``
    LD-DPO's (:func:`dpo_dist.train.loss.length_desensitized_logps`). Shape: each (B,)."""
    out = online_reference_logps(model, batch, shared=ld_alpha is not None, **kwargs)
    if ld_alpha is None:
        return out.chosen_logps, out.rejected_logps
    return (length_desensitized_logps(out.chosen_shared_logps, out.chosen_logps, ld_alpha),
            length_desensitized_logps(out.rejected_shared_logps, out.rejected_logps, ld_alpha))


def batch_reference_logps(
    mode: str, model: torch.nn.Module | None, batch: dict[str, torch.Tensor], *, ld_alpha: float | None = None,
    **kwargs: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(ref_chosen_logps, ref_rejected_logps)`` for one batch under ``mode``; ``(None, None)`` for ``none``.

    ``precomputed`` reads the batch's cached columns (computed with the same ``ld_alpha``: it is part of their cache
    key); ``online`` runs ``model`` as the reference (a frozen copy, or the policy, whose adapters are switched off).
    Shape: each (B,).
    """
    if mode == "precomputed":
        missing = [c for c in REFERENCE_COLUMNS if c not in batch]
        if missing:
            raise KeyError(f"reference mode 'precomputed' but the batch has no {missing}: run precompute_reference first")
        return batch[REFERENCE_COLUMNS[0]], batch[REFERENCE_COLUMNS[1]]
    if mode == "online":
        if model is None:
            raise ValueError("reference mode 'online' needs a reference model")
        return reference_pair_logps(model, batch, ld_alpha=ld_alpha, **kwargs)
    if mode == "none":
        return None, None
    raise ValueError(f"reference mode {mode!r} is not one of {REFERENCE_MODES}")


@dataclass(frozen=True)
class ReferenceScorer:
    """How the reference scores pairs: ``model`` as the reference, batches of ``batch_size`` made by ``collator`` (the
    training collator, so reference and policy are scored the same way), on ``accelerator``'s processes, log-probs
    chunked by ``chunk_size`` (with ``ld_alpha``: LD-DPO's weighted sums). ``stop_check(where)``, a collective called
    after every batch on every process, may end the scoring by raising (a preemption signal). ``show_progress``: the main
    process shows how far the scoring is (:mod:`dpo_dist.progress`)."""

    model: torch.nn.Module
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    accelerator: Any
    batch_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    stop_check: Callable[[str], None] | None = None
    ld_alpha: float | None = None
    show_progress: bool = True


def compute_reference_logps(scorer: ReferenceScorer, tokenized: datasets.Dataset) -> torch.Tensor:
    """Score every pair with the reference, sharded across processes, gathered back in dataset order.

    Pairs are sharded with ``distributed.shard_indices`` (every process runs the same number of forwards) and
    gathered back in order. The pairs keep their ``group``: a ranked row's pairs that meet in a batch (they are next
    to each other as loaded) are scored as the training collator scores them, the prompt and each response once.

    Shape: -> (N, 2) float32 on CPU: column 0 chosen, column 1 rejected, summed over response tokens (with
    ``ld_alpha``: LD-DPO's weighted sums); for groups (rankings) (N, K), K the set's largest k, response j of
    example i at [i, j] and 0 past its k.
    """
    accelerator, batch_size = scorer.accelerator, scorer.batch_size
    shard = shard_indices(len(tokenized), accelerator)
    grouped = is_grouped(tokenized)  # rankings: (N, K), response j at column j, 0 past an example's k
    width = largest_group(tokenized) if grouped else 2
    columns = list(GROUP_COLUMNS if grouped else PAIR_COLUMNS)
    if not grouped and GROUP in tokenized.column_names:  # a ranked row's pairs: merged as training merges them
        columns.append(GROUP)
    pairs = tokenized.select_columns(columns)
    results = [torch.zeros(0, width, device=accelerator.device)]
    batches = range(0, len(shard), batch_size)
    shown = scorer.show_progress and accelerator.is_main_process
    with progress(len(tokenized), "reference log-probs", unit="pair", shown=shown) as bar:
        for number, offset in enumerate(batches, 1):
            batch = scorer.collator([pairs[i] for i in shard[offset : offset + batch_size]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if grouped:
                logps = reference_group_logps(scorer.model, batch, chunk_size=scorer.chunk_size).float()
                results.append(torch.nn.functional.pad(logps, (0, width - logps.shape[1])))
            else:
                chosen, rejected = reference_pair_logps(scorer.model, batch, ld_alpha=scorer.ld_alpha,
                                                        chunk_size=scorer.chunk_size)
                results.append(torch.stack([chosen, rejected], dim=-1).float())
            # every process scores a batch of its share at a time: the pairs done so far, over all of them
            bar.update(min(len(tokenized), number * batch_size * accelerator.num_processes) - bar.n)
            if scorer.stop_check is not None:
                scorer.stop_check(f"while computing reference log-probs (batch {number} of {len(batches)}, nothing "
                                  "cached)")
    return gather_in_order(torch.cat(results), len(tokenized), accelerator).cpu()


def scoring_identity(model: Any, collator: Any, *, chunk_size: int, mixed_precision: str = "no",
                     device_type: str = "cpu", ld_alpha: float | None = None) -> dict:
    """How the log-probs are computed, beyond the model, tokenizer and data: the attention kernel, padded or packed
    (whether the prompt is shared, and a segmented attention layout where one applies), the log-prob chunking, mixed
    precision, the device type, LD-DPO's weight of the longer response's excess tokens (only when set, so summed
    log-probs keep their key), and the versions of the libraries that do the arithmetic. Numbers computed one way are
    never reused for another."""
    import transformers

    identity = {
        "attn_implementation": getattr(base_model(model).config, "_attn_implementation", None),
        "layout": "packed" if isinstance(collator, PackedPairCollator) else "padded",
        "share_prompt": getattr(collator, "share_prompt", None),
        "chunk_size": chunk_size,
        "mixed_precision": mixed_precision,
        "device_type": device_type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    # the adapter switch, and the 4-bit arithmetic of a quantized model: named by the installed version, not by what
    # this process happened to import already (the key must not depend on what ran before)
    if ld_alpha is not None:
        identity["ld_alpha"] = ld_alpha
    attention_layout = getattr(collator, "attention_layout", "dense")
    if attention_layout != "dense" and identity["attn_implementation"] == "sdpa":  # only then do spans take effect
        identity["attention_layout"] = attention_layout  # only then: dense caches keep their keys
    quantized = getattr(base_model(model), "is_quantized", False)
    for library, used in (("peft", True), ("bitsandbytes", quantized)):
        identity[library] = installed_version(library) if used else None
    return identity


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def reference_fingerprint_parts(model_identity: dict, tokenizer: Any, truncation: Truncation,
                                tokenized: datasets.Dataset, scoring: dict) -> dict:
    """Everything the reference log-probs depend on (see ``reference_cache.py``); ``scoring`` from
    :func:`scoring_identity`."""
    grouped = is_grouped(tokenized)  # rankings: every response's token ids, and a key pairs' never have
    parts = {
        "model": model_identity,
        "tokenizer": cache.tokenizer_identity(tokenizer),
        "truncation": truncation,
        "data": ({**cache.data_identity(tokenized, ("prompt_input_ids",)),
                  "responses": cache.groups_identity(tokenized, GROUP_COLUMN)}
                 if grouped else cache.data_identity(tokenized, PAIR_COLUMNS)),
        "scoring": scoring,
    }
    if grouped:
        parts["responses"] = "ranking"
    return parts



def precompute_reference(
    scorer: ReferenceScorer,
    tokenized: datasets.Dataset,
    *,
    fingerprint_parts: dict | None,
    cache_dir: str,
) -> datasets.Dataset:
    """``tokenized`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns (groups: ``ref_responses_logps``, k
    floats each), from the cache when it holds this fingerprint, else computed (all processes) and written (main
    process).

    The main process alone fingerprints, reads the cache and tells the others, so nodes need no shared disk, all
    processes agree whether to run the reference forwards, and the hashing is done once (other processes may pass
    ``fingerprint_parts=None``).
    """
    from accelerate.utils import broadcast, broadcast_object_list

    accelerator = scorer.accelerator

    n = len(tokenized)
    grouped = is_grouped(tokenized)
    width = largest_group(tokenized) if grouped else 2
    cached = key = path = None
    if accelerator.is_main_process:
        key = cache.fingerprint(fingerprint_parts)
        path = cache.cache_path(cache_dir, key)
        cached = cache.read_cache(path, key, n, width)
    hit = broadcast_object_list([cached is not None])[0]
    if hit:
        logger.info("reference log-probs for %d pairs read from %s", n, path)
        logps = cached if cached is not None else torch.zeros(n, width)
        if accelerator.num_processes > 1:
            logps = broadcast(logps.to(accelerator.device)).cpu()
    else:
        logger.info("computing reference log-probs for %d pairs on %d processes", n, accelerator.num_processes)
        logps = compute_reference_logps(scorer, tokenized)
        if accelerator.is_main_process:
            try:
                cache.write_cache(path, key, logps, fingerprint_parts)
                logger.info("reference log-probs cached at %s", path)
            except DiskFullError as error:  # the log-probs are here: training needs no cache
                logger.warning("reference log-probs not cached, training goes on (a later run computes them again): "
                               "%s", error)
        accelerator.wait_for_everyone()
    if grouped:  # one log-prob per response: example i's first k
        tokenized = tokenized.remove_columns([c for c in (GROUP_REFERENCE_COLUMN,) if c in tokenized.column_names])
        sizes = pyarrow.compute.list_value_length(tokenized.with_format("arrow")[GROUP_COLUMN]).to_pylist()
        return tokenized.add_column(GROUP_REFERENCE_COLUMN, [row[:k] for row, k in zip(logps.tolist(), sizes)])
    tokenized = tokenized.remove_columns([c for c in REFERENCE_COLUMNS if c in tokenized.column_names])
    tokenized = tokenized.add_column(REFERENCE_COLUMNS[0], logps[:, 0].tolist())
    return tokenized.add_column(REFERENCE_COLUMNS[1], logps[:, 1].tolist())
