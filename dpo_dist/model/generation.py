"""Completions of prompts given as token ids, with ``model.generate``: what the trainer samples at its sampling steps
and what evaluation samples both models with.

Prompts are left-padded into a batch; a response is its generated token ids up to and including the first EOS (one
cut by ``max_new_tokens`` has no EOS).
"""

from __future__ import annotations

from typing import Any

import torch


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, each prompt flush right. Shape: (len(prompts), longest prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_responses(model: Any, prompts: list[list[int]], config: Any, device: torch.device,
                       **generate_kwargs: Any) -> list[list[int]]:
    """One batch: ``config.num_return_sequences`` responses per prompt, in order (prompt 0's first, ...), as token
    ids cut after the first ``config.eos_token_id``. ``config``: a transformers ``GenerationConfig`` with its
    ``pad_token_id`` set."""
    ids, mask = left_padded(prompts, config.pad_token_id, device)
    generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **generate_kwargs)
    eos = config.eos_token_id
    new = generated[:, ids.shape[1] :].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in new]
