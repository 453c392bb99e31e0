"""A round's completions: ``n`` sampled from the policy for every training prompt, sharded over the processes,
cached batch by batch so that a stopped round resumes where it stopped.

    result = sample_round(model, tokenizer, prompts, n=4, sampling=Sampling(temperature=1.0, max_new_tokens=32),
                          batch_size=16, accelerator=accelerator, cache_dir=folder, stop_check=check)
    result.completions[i][j]  # the j-th completion of prompt i, token ids ending in EOS (unless cut by length)

The prompts are cut into batches of similar length (``model.generation.prompt_batches``, a pure function: the same
batches under any process count). Batch ``b`` is drawn with seed ``sampling.seed + b`` (``sample_batch``), so which
process samples it changes nothing: 1 and 2 processes give the same completions, token for token. The batches still
to sample go round-robin to the processes in waves, one batch per process per wave; after each wave the completions
are gathered, the main process writes each batch to ``cache_dir/batch-<b>.json`` (a temporary file renamed into
place: a file there is whole), and ``stop_check`` may stop the round. A rerun with the same ``cache_dir`` reads the
batches there (the main process, which then broadcasts them) and samples only the others.

``cache_dir`` is the caller's to key (on the policy checkpoint and the sampling settings); ``settings.json`` in it
records what it was sampled with, and a folder whose settings differ is refused (:class:`SamplingCacheMismatch`).

Under ZeRO-3 and FSDP2 with several processes each forward gathers sharded weights, a collective: every process runs
the same number of ``generate`` calls with ``synced_gpus`` (a process without a batch in the last wave samples a
stand-in batch and drops it), as training's samples do (``dpo_dist.train.samples``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from dpo_dist.distributed import forwards_are_collective, say
from dpo_dist.model.generation import Sampling, prompt_batches, sample_batch, sampling_config
from dpo_dist.progress import progress
from dpo_dist.rounds.records import write_json

SETTINGS_FILE = "settings.json"


class SamplingCacheMismatch(ValueError):
    """A round's sampling cache folder holds completions sampled with other settings (or other prompts)."""


@dataclass(frozen=True)
class RoundSamples:
    """A round's completions and what sampling them cost. ``completions[i][j]``: the j-th completion of prompt i, token
    ids. ``sampled`` completions (of ``tokens`` generated tokens, EOS included) were drawn in ``seconds`` by this call;
    the rest came from the cache (``cached_batches`` of ``batches``)."""

    completions: list[list[list[int]]]
    sampled: int
    tokens: int
    seconds: float
    batches: int
    cached_batches: int

    @property
    def completions_per_s(self) -> float:
        return self.sampled / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self, processes: int) -> str:
        """One line for the log: the throughput of what was sampled, and what came from the cache."""
        cached = f"; {self.cached_batches} of {self.batches} batches from the cache" if self.cached_batches else ""
        if not self.sampled:
            return f"sampling: all {self.batches} batches from the cache, nothing sampled"
        return (f"sampling: {self.sampled} completions ({self.tokens} tokens) in {self.seconds:.1f} s over {processes} "
                f"process{'es' if processes > 1 else ''}: {self.completions_per_s:.2f} completions/s, "
                f"{self.tokens_per_s:.1f} tokens/s{cached}")


def sampling_settings(prompts: list[list[int]], *, n: int, sampling: Sampling, batch_size: int) -> dict[str, Any]:
    """What a round's completions depend on besides the policy (which the caller keys the folder on): the sampling
    settings, the batch size (it decides which prompts share a batch, and so a batch's seed) and the prompts, by count
    and digest. Not the process count: the completions are the same under any."""
    digest = hashlib.sha256(json.dumps(prompts, separators=(",", ":")).encode()).hexdigest()
    return {"n": n, "sampling": dataclasses.asdict(sampling), "batch_size": batch_size, "prompts": len(prompts),
            "prompts_sha256": digest}


def settings_problem(there: dict[str, Any], here: dict[str, Any], cache_dir: str) -> str | None:
    """One line naming each setting that differs between a cache folder's ``settings.json`` and this call, or None."""
    flat = lambda d: {**{k: v for k, v in d.items() if k != "sampling"},  # noqa: E731
                      **{f"sampling.{k}": v for k, v in d.get("sampling", {}).items()}}
    a, b = flat(there), flat(here)
    differ = [f"{key} {a.get(key)!r} there, {b.get(key)!r} here" for key in sorted(set(a) | set(b))
              if a.get(key) != b.get(key)]
    if not differ:
        return None
    return (f"the sampling cache {cache_dir} holds completions sampled with other settings ({'; '.join(differ)}): "
            "give this round its own cache folder, or delete that one")


def batch_path(cache_dir: str, b: int) -> str:
    return os.path.join(cache_dir, f"batch-{b}.json")


def open_cache(cache_dir: str, settings: dict[str, Any], batches: list[list[int]]) -> tuple[str | None, dict]:
    """The main process's look at ``cache_dir``: (a refusal or None, the cached batches ``{b: completions}``). A new
    folder gets ``settings.json``; a batch file whose prompts are not batch b's is ignored (sampled again)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            problem = settings_problem(json.load(handle), settings, cache_dir)
        if problem:
            return problem, {}
    else:
        write_json(path, settings)
    cached = {}
    for b, indices in enumerate(batches):
        if os.path.isfile(batch_path(cache_dir, b)):
            with open(batch_path(cache_dir, b)) as handle:
                saved = json.load(handle)
            if saved["prompts"] == indices:
                cached[b] = saved["completions"]
    return None, cached


def waves(todo: list[int], processes: int) -> list[list[int]]:
    """``todo`` (batch numbers) dealt round-robin: wave w gives process r ``todo[w * processes + r]``; the last wave
    may be short. Shape: ``out[w][r]``."""
    return [todo[start : start + processes] for start in range(0, len(todo), processes)]


def sample_round(model: Any, tokenizer: Any, prompts: list[list[int]], *, n: int, sampling: Sampling,
                 batch_size: int, accelerator: Any, cache_dir: str, stop_check: Callable[[str], None] | None = None,
                 show_progress: bool = True) -> RoundSamples:
    """``n`` completions of every prompt from ``model`` (as ``accelerator.prepare`` returned it), on every process
    (each gets the whole result). ``stop_check(where)``, a collective called after each wave on every process, may
    stop the round by raising; the batches of the waves done are cached. The main process shows progress
    (``show_progress``) and logs the throughput at the end.

    Shape: ``result.completions`` is ``len(prompts)`` lists of ``n`` token-id lists."""
    import torch
    from accelerate.utils import broadcast_object_list, gather_object

    batches = prompt_batches(prompts, batch_size)
    settings = sampling_settings(prompts, n=n, sampling=sampling, batch_size=batch_size)
    shared = [None, {}]
    if accelerator.is_main_process:
        shared = list(open_cache(cache_dir, settings, batches))
    problem, done = broadcast_object_list(shared) if accelerator.num_processes > 1 else shared
    if problem:
        raise SamplingCacheMismatch(problem)

    processes, rank = accelerator.num_processes, accelerator.process_index
    synced = forwards_are_collective(accelerator)
    todo = [b for b in range(len(batches)) if b not in done]
    schedule = waves(todo, processes)
    config = sampling_config(tokenizer, sampling, n)
    policy = accelerator.unwrap_model(model)
    sampled = tokens = 0
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    shown = show_progress and accelerator.is_main_process
    initial = sum(len(batches[b]) for b in done)
    try:
        with progress(len(prompts), "sampling", unit="prompt", initial=initial, shown=shown) as bar, \
                torch.no_grad(), accelerator.autocast():
            for number, wave in enumerate(schedule, 1):
                mine = wave[rank] if rank < len(wave) else None
                if mine is not None or synced:  # a stand-in: every rank in every forward under ZeRO-3 and FSDP
                    b = wave[0] if mine is None else mine
                    completions = sample_batch(policy, [prompts[i] for i in batches[b]], config, accelerator.device,
                                               seed=sampling.seed + b, synced_gpus=synced)
                finished = gather_object([(mine, completions)] if mine is not None else [])
                for b, completions in finished:
                    done[b] = completions
                    sampled += sum(len(c) for c in completions)
                    tokens += sum(len(ids) for c in completions for ids in c)
                    if accelerator.is_main_process:
                        write_json(batch_path(cache_dir, b), {"prompts": batches[b], "completions": completions})
                bar.update(sum(len(batches[b]) for b in wave))
                if stop_check is not None:
                    stop_check(f"while sampling (wave {number} of {len(schedule)}; {len(done)} of {len(batches)} "
                               f"batches cached in {cache_dir})")
    finally:
        model.train(was_training)
    out: list[list[list[int]]] = [[] for _ in prompts]
    for b, indices in enumerate(batches):
        for i, completions in zip(indices, done[b]):
            out[i] = completions
    result = RoundSamples(out, sampled, tokens, time.perf_counter() - started, len(batches), len(batches) - len(todo))
    say(accelerator, result.summary(processes))
    return result
