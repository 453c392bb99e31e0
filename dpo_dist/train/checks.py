"""Why a run stops: combinations that cannot work, refused at start, and the error the loop stops with."""

from __future__ import annotations

import torch

from dpo_dist.config import SENTIMENT, Config
from dpo_dist.train.metrics import is_finite

LAUNCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says where and what is left on disk."""


def check_combination(cfg: Config, stage: int) -> None:
    """Combinations that cannot work stop the run at start, naming the fix."""
    if stage and cfg.model.quantization != "none":
        raise TrainingError(
            f"model.quantization={cfg.model.quantization} cannot be sharded by DeepSpeed ZeRO-{stage}: launch without a "
            "DeepSpeed config (QLoRA trains on one device), or set model.quantization=none"
        )
    if stage == 3 and cfg.data.source == SENTIMENT:
        raise TrainingError(
            "the built-in sentiment set is sampled by one process from an unsharded model: build it once without "
            "ZeRO-3 (python launch/train.py train.max_steps=1; it is cached), then point data.source and "
            "data.eval_source at the cached files in ~/.cache/dpo_dist/data/, or use your own data"
        )


def check_launch_precision(launched: str, compute: torch.dtype) -> None:
    """``accelerate launch --mixed_precision`` (or its config's ``mixed_precision``) set to bf16 or fp16 must be what
    ``model.dtype`` resolves to; ``no`` (the shipped configs) leaves the choice to ``model.dtype``."""
    if launched == "no" or LAUNCH_DTYPES.get(launched) == compute:
        return
    name = str(compute).removeprefix("torch.")
    fix = (f"set model.dtype={str(LAUNCH_DTYPES[launched]).removeprefix('torch.')}" if launched in LAUNCH_DTYPES
           else "dpo_dist trains in float32, bfloat16 or float16")
    raise TrainingError(
        f"accelerate launch asks for mixed precision {launched} (--mixed_precision or its config), but model.dtype "
        f"resolves to {name}: model.dtype owns the precision; {fix}, or launch with --mixed_precision no"
    )


def check_step(step: int, record: dict[str, float], *, applied: bool, loss_scaling: bool,
               last_checkpoint: str | None) -> str | None:
    """None for a step whose loss and gradient norm are finite.

    A finite loss whose fp16 gradients overflowed, the update skipped by the loss scaler (a GradScaler, or
    DeepSpeed's), is routine: the scale is lowered and training goes on; returns a line saying so. Anything else
    non-finite raises :class:`TrainingError`, saying whether the update was applied: the loop checks the loss before
    the backward that would apply it (under DeepSpeed the last micro-batch's backward steps the engine) and the
    gradient norm before ``optimizer.step``, except under DeepSpeed, whose step comes first and skips non-finite
    gradients unless its overflow check is off.
    """
    loss, grad_norm = record["loss"], record["grad_norm"]
    if is_finite(loss, grad_norm):
        return None
    if is_finite(loss) and loss_scaling and not applied:
        return (f"step {step}: the fp16 gradients overflowed at the current loss scale; the loss scaler skipped this "
                "update and lowered the scale")
    what = "loss" if not is_finite(loss) else "gradient norm"
    last = f"last good checkpoint: {last_checkpoint or 'none (set train.save_every)'}"
    if applied:
        raise TrainingError(
            f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm}): DeepSpeed applied this update "
            "before it could be checked (its overflow check is off, e.g. bf16.check_grad_overflow=false), so the "
            f"weights in memory are not finite and the run stops without saving them; resume from the {last}"
        )
    raise TrainingError(
        f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm}): stopped before applying it; {last}"
    )
