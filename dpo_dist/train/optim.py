"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpo_dist.config import Config


def build_optimizer(model: Any, cfg: Config, *, grad_scaler: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's, or bitsandbytes' 8-bit / paged variants.

    ``grad_scaler``: a torch GradScaler will drive the steps (fp16 without DeepSpeed). It then keeps torch's
    per-tensor AdamW: a fused AdamW takes the scaler's overflow flag and skips the update itself, so its ``step`` is
    always called, and Accelerate (which sees a skipped step as a ``step`` not called) would report every skipped
    step as applied."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": t.learning_rate, "betas": tuple(t.adam_betas), "weight_decay": t.weight_decay}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs, **({} if grad_scaler else torch_adamw_kernel(params)))
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[t.optimizer]
    return cls(params, **kwargs)


def torch_adamw_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """torch's fused AdamW (one kernel over all tensors) where it runs: floating parameters on CPU or CUDA. Else its
    default (a loop over the tensors on CPU, ``foreach`` on GPU). Fused computes the same update in another order:
    after 23 steps of the default run's 420 LoRA tensors the weights differ by at most 1.5e-8, and the optimizer
    step took 12 ms instead of 52 ms (1 CPU thread)."""
    devices = {p.device.type for p in params}
    if params and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


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


def windowed_lr_lambda(windows: list[tuple[int, int]], warmup_ratio: float, kind: str):
    """:func:`lr_lambda` restarted in each window ``(first step, steps)`` of ``windows`` (an iterative-DPO round's
    steps), the warmup ``warmup_ratio`` of each. ``windows`` is read at every call: the caller appends a round's
    window once its pairs are known. A step in no window (before the first is known) gets 0. A closure, not an
    object, so that the scheduler's state_dict does not save the windows: a resumed run rebuilds them from its
    rounds' own records."""
    def factor(step: int) -> float:
        for first, steps in reversed(windows):
            if first <= step:
                return lr_lambda(steps, round(warmup_ratio * steps), kind)(step - first) if step < first + steps else 0.0
        return 0.0

    return factor


def take_hyperparameters(scheduler: Any, cfg: Config) -> None:
    """After a resume: the learning rate, weight decay and betas from ``cfg``, not from the checkpoint.

    Loading a checkpoint restores the optimizer's parameter groups (lr, initial_lr, weight_decay, betas) and the
    scheduler's base_lrs and last lr as they were saved, so a learning rate changed at the resume would be ignored
    while config.yaml named it. The schedule's shape is this run's already (``lr_lambda``'s closure over the new
    total and warmup is not saved). Each group then gets its value at the resumed step, base x factor(step), exactly
    what ``scheduler.step()`` computes: a resume with an unchanged config continues bit for bit."""
    t, optimizer = cfg.train, scheduler.optimizer
    for group in optimizer.param_groups:
        group["initial_lr"] = t.learning_rate
        group["weight_decay"] = t.weight_decay
        group["betas"] = tuple(t.adam_betas)
    scheduler.base_lrs = [t.learning_rate for _ in optimizer.param_groups]
    values = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(optimizer.param_groups, values):
        group["lr"] = value
    scheduler._last_lr = values  # what get_last_lr() reports, logged as the step's lr
