"""Sampling responses to prompts given as token ids, and scoring responses under a model.

Prompts are the token ids the model was trained with (BOS and chat template included), so what is sampled here
continues exactly the text the pairs had. A response is its generated token ids up to and including the first EOS;
one cut by ``max_new_tokens`` has no EOS.
"""

from __future__ import annotations

import torch

from dpo_dist.eval.options import Sampling
from dpo_dist.model.generation import generate_responses
from dpo_dist.train.logprobs import IGNORE_INDEX, sequence_logps


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module, tokenizer, prompts: list[list[int]], *, n: int, sampling: Sampling, batch_size: int,
    device: torch.device,
) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt: ``out[i][j]`` is the j-th response to prompt i, as token ids.

    Each batch of prompts is seeded with ``sampling.seed`` plus its index, so two models given the same prompts and
    seed draw with the same random numbers (their differences are the models', not the dice's).
    """
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens, num_return_sequences=n, eos_token_id=eos, pad_token_id=pad,
        use_cache=True,
    )
    out: list[list[list[int]]] = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        torch.manual_seed(sampling.seed + index)
        responses = generate_responses(model, prompts[start : start + batch_size], config, device)
        out += [responses[i : i + n] for i in range(0, len(responses), n)]
    return out


@torch.no_grad()
def response_logps(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], *, batch_size: int,
    device: torch.device, pad_id: int = 0,
) -> torch.Tensor:
    """The summed log-prob of each response given its prompt (prompt tokens are not scored).

    Shape: prompts, responses: N lists of ids -> (N,) float32.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [p + r for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, row) in enumerate(zip(prompts[start:], rows)):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(p) : len(row)] = ids[i, len(p) : len(row)]
            mask[i, : len(row)] = 1
        positions = torch.arange(width).expand(len(rows), width)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False).logits
        out.append(sequence_logps(logits, labels.to(device))[0].float().cpu())
    return torch.cat(out)
