"""Scoring responses under a model: the summed log-prob of each response given its prompt, for the KL estimate
(``dpo_dist.eval.against_base``) and the LLM judge (``dpo_dist.eval.judges``). Sampling them is
``dpo_dist.model.generation``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_dist.train.logprobs import IGNORE_INDEX, sequence_logps


@torch.no_grad()
def response_logps(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], *, batch_size: int,
    device: torch.device, pad_id: int = 0, progress: Any = None,
) -> torch.Tensor:
    """The summed log-prob of each response given its prompt (prompt tokens are not scored). ``progress``: a bar
    (:mod:`dpo_dist.progress`) told of each batch of responses scored.

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
        if progress is not None:
            progress.update(len(rows))
    return torch.cat(out)
