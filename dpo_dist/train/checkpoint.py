"""Checkpoints that are whole or absent, resume from the latest, and the final export.

A checkpoint is written into ``checkpoint-<step>.tmp`` (Accelerate's ``save_state``: model, optimizer, scheduler,
RNG states of every process, then ``trainer_state.json`` last) and renamed to ``checkpoint-<step>`` only when all of
it is on disk, so a run killed mid-write leaves the previous checkpoint as the latest. For LoRA policies only the
trainable (adapter) weights are stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from dpo_dist.config import Config

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed into this run; the message names it and the likely cause."""


@dataclass
class TrainState:
    global_step: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def adapter_only_checkpoints(accelerator: Any, model: Any) -> None:
    """Store only trainable weights in checkpoints of a LoRA policy; check on load that the file holds exactly them."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def keep_trainable(models: list, weights: list, output_dir: str) -> None:
        for i, m in enumerate(models):
            if m is model:
                weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    def check_file(models: list, input_dir: str) -> None:
        from safetensors import safe_open

        path = os.path.join(input_dir, "model.safetensors")
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
        if keys != trainable:
            raise CheckpointError(
                f"{path} holds {len(keys)} tensors, the policy has {len(trainable)} trainable ones: "
                "the checkpoint was written by another model or LoRA setup"
            )

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(check_file)


def save_checkpoint(accelerator: Any, output_dir: str, state: TrainState, *, keep_last: int) -> str:
    """Write ``checkpoint-<step>`` atomically (all processes call this), then prune old ones (never the best)."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(asdict(state), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        keep = {path for _, path in list_checkpoints(output_dir)[-keep_last:]}
        keep |= {final, state.best_checkpoint}
        for _, path in list_checkpoints(output_dir):
            if path not in keep:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str, *, adapter_only: bool) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states. A full model's weights must match the checkpoint key for
    key (strict): a checkpoint written by another model, or by a run with another number of processes (DDP stores
    ``module.``-prefixed keys), is an error, never a silent restart from the initial weights."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        accelerator.load_state(path)  # DeepSpeed's own checkpoint format, every rank its shards
        return _read_state(path)
    try:  # adapter-only files hold a subset of the keys; the pre-hook checks them exactly
        accelerator.load_state(path, strict=not adapter_only)
    except CheckpointError:
        raise
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not fit this model: {str(error).splitlines()[0]} (was it written by another model, or by a "
            "run with another number of processes? resume with the same setup, or set train.resume=never)"
        ) from error
    return _read_state(path)


def _read_state(path: str) -> TrainState:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        return TrainState(**json.load(handle))


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, path: str) -> None:
    """The LoRA adapter (``PeftModel.from_pretrained`` loads it) or the full model, with the tokenizer; atomic."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def track_best(state: TrainState, record: dict[str, float], cfg: Config) -> tuple[bool, str | None]:
    """Update the best eval metric; returns (improved, a stop message when patience ran out)."""
    t = cfg.train
    value = record[t.metric_for_best]
    better = state.best_metric is None or (value > state.best_metric if t.greater_is_better else value < state.best_metric)
    if better:
        state.best_metric, state.evals_without_improvement = value, 0
        return True, None
    state.evals_without_improvement += 1
    if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
        return False, (f"early stopping at step {state.global_step}: {t.metric_for_best} has not improved on "
                       f"{state.best_metric:.4f} for {state.evals_without_improvement} evals")
    return False, None
