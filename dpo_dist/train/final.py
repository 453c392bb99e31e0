"""The end of a run: its final weights as a model folder, ``model/``, and the same folder from a checkpoint.

The final state is written as a checkpoint first (:func:`checkpoint_final_state`), so that an export that fails (a
full disk) is retried by running the same command again, which resumes there, trains nothing and exports. Then
:func:`final_weights` says which weights ``model/`` gets (the last step's; with early stopping the best checkpoint's,
loaded back), and :func:`save_final_model` writes them atomically: the LoRA adapter or the full model, with the
tokenizer. :func:`save_checkpoint_model` writes what ``model/`` would have held had training stopped at a
checkpoint, from the checkpoint's files alone (for ``launch/push.py``, through :mod:`dpo_dist.publish.export`). A
write that runs out of space removes its ``.tmp`` and says so in one line (:mod:`dpo_dist.train.disk`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from dpo_dist.config import STATE_FILE, Config
from dpo_dist.model.adapters import as_plain_lora
from dpo_dist.model.load import config_set_to
from dpo_dist.train.checkpoint import (
    ALONE,
    DEEPSPEED_MODEL,
    FSDP_MODEL,
    CheckpointError,
    TrainState,
    checkpoint_step,
    holds_deepspeed_shards,
    holds_fsdp_shards,
    latest_checkpoint,
    load_checkpoint,
    read_sharded,
    save_checkpoint,
    verify_checkpoint,
)
from dpo_dist.train.disk import reporting_full_disk, tensor_bytes


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, path: str, *,
                     base_config: dict[str, Any] | None = None) -> None:
    """The LoRA adapter (``PeftModel.from_pretrained`` loads it) or the full model, with the tokenizer; atomic. A full
    model's config.json gets ``base_config`` (:func:`~dpo_dist.model.load.base_config_values`: the base's
    ``use_cache`` and dropout, which loading for training turned off), the live model's config left as it is. A full
    disk is :class:`~dpo_dist.train.disk.DiskFullError`, the ``.tmp`` removed."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        restored = {} if hasattr(unwrapped, "peft_config") else base_config or {}  # an adapter has no model config
        with reporting_full_disk(path, tmp, needed=lambda: _export_bytes(unwrapped, state_dict, tokenizer),
                                 then=lambda: _export_hint(os.path.dirname(path))), config_set_to(unwrapped, restored):
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            as_plain_lora(tmp, os.path.dirname(path))  # PiSSA/OLoRA: onto the unmodified base (model/adapters.py)
            tokenizer.save_pretrained(tmp)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    accelerator.wait_for_everyone()


def save_checkpoint_model(path: str, folder: str) -> None:
    """The weights of the checkpoint ``path`` written to ``folder`` (replaced) as the model folder the run's ``model/``
    would be had training stopped there: the LoRA adapter, or the full model with the base's ``use_cache`` and
    dropout, and the tokenizer (:func:`dpo_dist.publish.export.export_checkpoint` adds the card and renames it into
    place). The run's ``config.yaml`` (the folder above) says how to build the policy; it is built on the CPU (for
    LoRA with its base in full precision, whatever the run's quantization: only the adapter is saved) in the dtype of
    the checkpoint's weights, which must then fit it name for name. An FSDP2 run's checkpoint holds each rank's shards
    (``torch.distributed.checkpoint``): they are read whole (:func:`fsdp_weights`; for LoRA the adapter is kept of
    them); a DeepSpeed run's are put together by DeepSpeed's ``zero_to_fp32`` (:func:`deepspeed_weights`), its fp32
    master weights. A checkpoint whose files differ from its manifest is refused, naming the file. Every error is
    raised before ``folder`` is touched."""
    import torch
    from safetensors.torch import load_file

    from dpo_dist.model.load import base_config_values, load_policy
    from dpo_dist.model.trained import run_config

    run = os.path.dirname(os.path.abspath(path))
    problem, _ = verify_checkpoint(ALONE, path)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}. Export another checkpoint, or the run's model/")
    weights = os.path.join(path, "model.safetensors")
    fsdp, deepspeed = holds_fsdp_shards(path), holds_deepspeed_shards(path)
    if fsdp:
        weights = os.path.join(path, FSDP_MODEL)
    elif deepspeed:
        weights = os.path.join(path, DEEPSPEED_MODEL)
    elif not os.path.isfile(weights):
        raise CheckpointError(f"{path} holds no model.safetensors, no FSDP2 and no DeepSpeed shards: is it a "
                              "checkpoint? (those of a run are its checkpoint-<step> folders)")
    cfg = run_config(path)
    if cfg is None:
        raise CheckpointError(f"{path}: no config.yaml in {run}: which model the checkpoint belongs to is unknown")
    state = fsdp_weights(weights) if fsdp else deepspeed_weights(path) if deepspeed else load_file(weights)
    if state and all(name.startswith("module.") for name in state):  # written by a DDP run (its wrapper's names)
        state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    cfg.model.quantization, cfg.model.gradient_checkpointing = "none", False
    model, tokenizer = load_policy(cfg, torch.device("cpu"), dtype)
    own = model.state_dict()
    expected = {name for name, p in model.named_parameters() if p.requires_grad} if cfg.lora.enabled else set(own)
    if fsdp and cfg.lora.enabled:  # FSDP2 stores the frozen base too: the adapter is what model/ holds
        state = {name: tensor for name, tensor in state.items() if name in expected or name not in own}
    stored = {own[name].data_ptr() for name in state if name in own}
    missing = sorted(name for name in expected - set(state)
                     if cfg.lora.enabled or own[name].data_ptr() not in stored)  # a tied weight is stored once
    unexpected = sorted(set(state) - expected)
    misfit = f"{weights} does not fit the model config.yaml describes"
    hint = "was the run's config.yaml changed since it was written?"
    if unexpected or missing:
        raise CheckpointError(f"{misfit} ({len(unexpected)} unexpected and {len(missing)} missing weights, e.g. "
                              f"{(unexpected or missing)[0]}): {hint}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape that differs
        raise CheckpointError(f"{misfit}: {str(error).splitlines()[-1].strip().rstrip('.')}: {hint}") from None
    shutil.rmtree(folder, ignore_errors=True)
    with config_set_to(model, {} if cfg.lora.enabled else base_config_values(cfg)):
        model.save_pretrained(folder)
    if cfg.lora.enabled:
        as_plain_lora(folder, run)
    tokenizer.save_pretrained(folder)


def deepspeed_weights(path: str) -> dict[str, Any]:
    """The fp32 weights a DeepSpeed checkpoint's shards hold, as whole tensors by name: DeepSpeed's own
    ``zero_to_fp32`` puts every rank's flat partitions of the optimizer's fp32 master weights together (ZeRO-2 or
    ZeRO-3, any process count), in this process. A LoRA run's checkpoint holds only the trainable weights (the
    adapter); a full fine-tune's a weight tied to another under both names."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # a line per parameter group and shard
        return dict(get_fp32_state_dict_from_zero_checkpoint(path, tag=DEEPSPEED_MODEL,
                                                             exclude_frozen_parameters=True))


def fsdp_weights(folder: str) -> dict[str, Any]:
    """The weights an FSDP2 checkpoint's ``torch.distributed.checkpoint`` folder holds, as whole tensors by name:
    every rank's slices put together (:func:`~dpo_dist.train.checkpoint.read_sharded`), in this process, with no
    process group. The names and shapes come from the folder's ``.metadata``."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    template = {name.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                for name, meta in stored.items() if isinstance(meta, TensorStorageMetadata)}
    return read_sharded(folder, "model", template)


def _export_bytes(unwrapped: Any, state_dict: dict, tokenizer: Any) -> tuple[int, str]:
    """About what ``model/`` takes: the weights it stores (the adapter's for LoRA), the tokenizer's JSON and 16 KiB
    for the small config files."""
    weights = state_dict
    if hasattr(unwrapped, "peft_config"):
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = len(backend.to_str(pretty=True).encode()) if backend is not None else 0
    what = "adapter" if weights is not state_dict else "model"
    return tensor_bytes(weights.values()) + text + (16 << 10), f"the {what} weights, the tokenizer and configs"


def _export_hint(output_dir: str) -> str:
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return "free space and run the same command again"
    return (f"the final state is in {latest}: free space and run the same command again to export it (it resumes "
            "there and trains no further step)")


def checkpoint_final_state(accelerator: Any, output_dir: str, state: TrainState, cfg: Config) -> None:
    """Before the export, the final state as ``checkpoint-<last step>`` (unless the last step has one already): an
    export that fails (a full disk) is retried by running the same command again, which resumes there, trains
    nothing and exports. With ``train.save_every`` unset it is not meant to stay (:func:`drop_final_checkpoint`),
    so it prunes nothing. All processes call this; the main process's folder decides."""
    from accelerate.utils import broadcast_object_list

    path = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    there = [os.path.isfile(os.path.join(path, STATE_FILE)) if accelerator.is_main_process else None]
    if not broadcast_object_list(there)[0]:
        save_checkpoint(accelerator, output_dir, state, keep_last=cfg.train.keep_last if cfg.train.save_every else None,
                        adapter_only=cfg.lora.enabled)


def drop_final_checkpoint(accelerator: Any, output_dir: str, state: TrainState, cfg: Config) -> None:
    """Once ``model/`` is written: without ``train.save_every`` (no checkpoints asked for) the final one goes, unless
    it is the best. Main process."""
    best = checkpoint_step(state.best_checkpoint)
    if accelerator.is_main_process and not cfg.train.save_every and best != state.global_step:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{state.global_step}"), ignore_errors=True)


@dataclass(frozen=True)
class FinalWeights:
    """Which weights ``model/`` gets: the step they are from, and what they are in words (``run.json``'s ``model``,
    which the card shows; the log says :attr:`said`)."""

    step: int
    which: str

    @property
    def said(self) -> str:
        return f"model/: {self.which}"


def final_weights(accelerator: Any, state: TrainState, output_dir: str, cfg: Config) -> FinalWeights:
    """The weights the final export holds: the last step's, or with early stopping (selection by metric, whether or
    not it stopped early) the best checkpoint's, loaded here (with its optimizer and RNG states, harmless once
    training is over) so that ``model/`` is the best model, not the last. All processes call this."""
    t = cfg.train
    last = FinalWeights(state.global_step, f"the weights at step {state.global_step}, the last")
    best = checkpoint_step(state.best_checkpoint)
    if not t.early_stopping_patience or best is None or best == state.global_step:
        return last
    path = os.path.join(output_dir, f"checkpoint-{best}")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        return FinalWeights(state.global_step, f"{last.which}: the best checkpoint {path} is not there any more")
    problem, _ = verify_checkpoint(accelerator, path)
    if problem:
        return FinalWeights(state.global_step, f"{last.which}: the best checkpoint {path} is damaged ({problem})")
    load_checkpoint(accelerator, path, adapter_only=cfg.lora.enabled)
    return FinalWeights(best, f"the weights of {path}, the best {t.metric_for_best} ({state.best_metric:.4f}), not "
                              f"those of the last step {state.global_step}")
