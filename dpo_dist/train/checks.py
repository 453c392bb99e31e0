"""Why a run stops: combinations that cannot work, refused at start, and the error the loop stops with."""

from __future__ import annotations

from dpo_dist.config import Config


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says where and what is left on disk."""


def check_combination(cfg: Config, stage: int) -> None:
    """Combinations that cannot work stop the run at start, naming the fix."""
    if stage and cfg.model.quantization != "none":
        raise TrainingError(
            f"model.quantization={cfg.model.quantization} cannot be sharded by DeepSpeed ZeRO-{stage}: launch without a "
            "DeepSpeed config (QLoRA trains on one device), or set model.quantization=none"
        )
