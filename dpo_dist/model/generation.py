"""Generation, the one place that calls ``model.generate``: completions of prompts given as token ids, for sampling
while training (``dpo_dist.train.samples``), evaluation against the base (``dpo_dist.eval.against_base``), chat
(``dpo_dist.eval.chat``) and anything else that samples from a policy.

Prompts are the token ids the model was trained with (BOS and chat template included), so what is sampled continues
exactly the text the pairs had. They are left-padded into a batch; a response is its generated token ids up to and
including the first EOS (one cut by ``max_new_tokens`` has no EOS).

    config = generation_config(tokenizer, max_new_tokens=64, temperature=None)       # greedy
    responses = generate_responses(model, prompts, config, device)
    samples = sample_responses(model, tokenizer, prompts, n=4, sampling=Sampling(), batch_size=8, device=device)

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


def sample_responses(model: Any, tokenizer: Any, prompts: list[list[int]], *, n: int, sampling: Sampling,
                     batch_size: int, device: Any, progress: Any = None) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt: ``out[i][j]`` is the j-th response to prompt i, as token ids. ``progress``:
    a bar (:mod:`dpo_dist.progress`) told of each batch of prompts done.

    Each batch of prompts is seeded with ``sampling.seed`` plus its index, so two models given the same prompts and
    seed draw with the same random numbers (their differences are the models', not the dice's).
    """
    import torch

    config = generation_config(tokenizer, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, top_k=sampling.top_k, num_return_sequences=n)
    out: list[list[list[int]]] = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        torch.manual_seed(sampling.seed + index)
        responses = generate_responses(model, prompts[start : start + batch_size], config, device)
        out += [responses[i : i + n] for i in range(0, len(responses), n)]
        if progress is not None:
            progress.update(len(responses) // n)
    return out
