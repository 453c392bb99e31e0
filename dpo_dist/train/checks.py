"""Why a run stops: combinations that cannot work, refused at start, and the error the loop stops with."""

from __future__ import annotations

from dpo_dist.config import SENTIMENT, Config


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says where and what is left on disk."""


def check_combination(cfg: Config, stage: int, fsdp: int = 0) -> None:
    """Combinations that cannot work stop the run at start, naming the fix. ``stage``: the ZeRO stage (0: none);
    ``fsdp``: the FSDP version (0: none)."""
    if (stage or fsdp) and cfg.model.quantization != "none":
        engine, config = ("FSDP2", "an FSDP") if fsdp else (f"DeepSpeed ZeRO-{stage}", "a DeepSpeed")
        raise TrainingError(
            f"model.quantization={cfg.model.quantization} cannot be sharded by {engine}: launch without {config} "
            "config (QLoRA trains on one device), or set model.quantization=none"
        )
    if stage == 3 and cfg.data.source == SENTIMENT:
        raise TrainingError(
            "the built-in sentiment set is sampled by one process from an unsharded model: build it once without "
            "ZeRO-3 (python launch/train.py train.max_steps=1; it is cached), then point data.source and "
            "data.eval_source at the cached files in ~/.cache/dpo_dist/data/, or use your own data"
        )
