"""Generation, the one place that calls ``model.generate``: completions of prompts given as token ids, for sampling
while training (``dpo_dist.train.samples``), evaluation against the base (``dpo_dist.eval.against_base``), chat
(``dpo_dist.eval.chat``) and anything else that samples from a policy.

Prompts are the token ids the model was trained with (BOS and chat template included), so what is sampled continues
exactly the text the pairs had. They are left-padded into a batch; a response is its generated token ids up to and
including the first EOS (one cut by ``max_new_tokens`` has no EOS).

    config = generation_config(tokenizer, max_new_tokens=64, temperature=None)       # greedy
    responses = generate_responses(model, prompts, config, device)
    samples = sample_responses(model, tokenizer, prompts, n=4, sampling=Sampling(), batch_size=8, device=device)

A round of iterative DPO samples many completions of many prompts: :func:`prompt_batches` cuts the prompts into
batches of similar length (little left padding), and :func:`sample_batch` draws one batch's completions under its own
seed. That pair is the seam where a faster engine (vLLM, SGLang) would plug in: it takes token ids and a seed and
returns token ids.

torch and transformers are imported inside the functions, so that :class:`Sampling` (``launch/evaluate.py``'s
defaults, through ``dpo_dist.eval.options``) reads without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled. The defaults sample from the model's own distribution (the only setting under
    which the samples estimate the KL divergence)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def exact(self) -> bool:
        """Whether samples come from the model's distribution itself (no temperature, top-p or top-k)."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


def generation_config(tokenizer: Any, *, max_new_tokens: int, temperature: float | None, top_p: float = 1.0,
                      top_k: int = 0, num_return_sequences: int | None = None,
                      eos_token_id: int | list[int] | None = None) -> Any:
    """A transformers ``GenerationConfig``: greedy (``temperature`` None: the most likely token at each step), or
    sampled at ``temperature`` with ``top_p`` and ``top_k`` (1.0 and 0: off). ``eos_token_id``: one id or several
    (default the tokenizer's); the pad id is the tokenizer's, else the (first) EOS."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if isinstance(eos, list) else eos
    sampled = temperature is not None
    return GenerationConfig(
        do_sample=sampled, temperature=temperature, top_p=top_p if sampled else None, top_k=top_k if sampled else None,
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        **({"num_return_sequences": num_return_sequences} if num_return_sequences is not None else {}),
    )


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Input ids and attention mask, each prompt flush right. Shape: (len(prompts), longest prompt)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_responses(model: Any, prompts: list[list[int]], config: Any, device: Any,
                       **generate_kwargs: Any) -> list[list[int]]:
    """One batch: ``config.num_return_sequences`` responses per prompt, in order (prompt 0's first, ...), as token
    ids cut after the first of ``config.eos_token_id`` (one id or several). ``config``: a transformers
    ``GenerationConfig`` with its ``pad_token_id`` set (:func:`generation_config`); ``generate_kwargs`` go to
    ``model.generate`` (a ``streamer``, ``synced_gpus``)."""
    import torch

    ids, mask = left_padded(prompts, config.pad_token_id, device)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **generate_kwargs)
    eos = config.eos_token_id
    stops = set(eos) if isinstance(eos, list) else {eos}
    new = generated[:, ids.shape[1] :].tolist()
    return [row[: next(i for i, token in enumerate(row) if token in stops) + 1] if stops & set(row) else row
            for row in new]


def prompt_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The indices of ``prompts`` sorted by length (shortest first; equal lengths in their order) and cut into batches
    of ``batch_size`` (the last may be shorter). Sorted, a batch's prompts are of nearly one length, so left padding
    adds few positions and a short prompt does not wait on a long one. A pure function of the prompts: every process
    of any launch computes the same batches, so batch ``b`` (and its seed) is the same under 1 process or 8.

    Shape: ``out[b]`` the prompt indices of batch b; ``sum(len(batch) for batch in out) == len(prompts)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # sorted() is stable
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sample_batch(model: Any, prompts: list[list[int]], config: Any, device: Any, *, seed: int,
                 **generate_kwargs: Any) -> list[list[list[int]]]:
    """One batch's sampled completions, ``config.num_return_sequences`` (n) per prompt, drawn from a generator seeded
    with ``seed``: ``out[i][j]`` the j-th completion of ``prompts[i]``, token ids cut after EOS
    (:func:`generate_responses`: left padding, KV cache). The caller's random state is left as it was (a forked
    generator), so sampling in the middle of training changes none of training's draws, and a batch's completions
    depend on its seed and prompts only, not on what was sampled before it (nor on which process samples it).
    ``generate_kwargs`` go to ``model.generate`` (``synced_gpus`` under ZeRO-3 and FSDP)."""
    import torch

    n = config.num_return_sequences or 1
    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        responses = generate_responses(model, prompts, config, device, **generate_kwargs)
    return [responses[i : i + n] for i in range(0, len(responses), n)]


def sample_responses(model: Any, tokenizer: Any, prompts: list[list[int]], *, n: int, sampling: Sampling,
                     batch_size: int, device: Any, progress: Any = None) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt: ``out[i][j]`` is the j-th response to prompt i, as token ids. ``progress``:
    a bar (:mod:`dpo_dist.progress`) told of each batch of prompts done.

    Each batch of prompts (in the given order) is seeded with ``sampling.seed`` plus its index, so two models given
    the same prompts and seed draw with the same random numbers (their differences are the models', not the dice's).
    """
    config = sampling_config(tokenizer, sampling, n)
    out: list[list[list[int]]] = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = sample_batch(model, prompts[start : start + batch_size], config, device, seed=sampling.seed + index)
        out += batch
        if progress is not None:
            progress.update(len(batch))
    return out


def sampling_config(tokenizer: Any, sampling: Sampling, n: int) -> Any:
    """The ``GenerationConfig`` of :class:`Sampling`'s settings, ``n`` completions per prompt."""
    return generation_config(tokenizer, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                             top_p=sampling.top_p, top_k=sampling.top_k, num_return_sequences=n)
