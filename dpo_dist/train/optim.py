"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpo_dist.config import Config


def build_optimizer(model: Any, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's, or bitsandbytes' 8-bit / paged variants."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": t.learning_rate, "betas": tuple(t.adam_betas), "weight_decay": t.weight_decay}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[t.optimizer]
    return cls(params, **kwargs)


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
