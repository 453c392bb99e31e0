"""Checkpoints that are whole or absent, resume from the latest, and the LoRA hooks that store only the adapter.

A checkpoint is written into ``checkpoint-<step>.tmp`` (Accelerate's ``save_state``: model, optimizer, scheduler,
RNG states of every process, then ``trainer_state.json`` last), fsynced file by file and folder by folder, and renamed
to ``checkpoint-<step>`` only when all of it is on disk, so a run killed mid-write leaves the previous checkpoint as
the latest; the ``.tmp`` it leaves is removed when the next run starts. For LoRA policies only the trainable (adapter)
weights are stored, with any number of processes, with or without DeepSpeed. A run that starts from step N (a resume,
or 0) moves checkpoints past N, left by a run it does not continue, to ``abandoned/``. The best checkpoint is known by
its step and never pruned (which one is best: :mod:`dpo_dist.train.best`; the final export:
:mod:`dpo_dist.train.final`). A write that runs out of space removes its ``.tmp`` and says so in one line
(:mod:`dpo_dist.train.disk`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from dpo_dist.config import CHECKPOINT_FOLDER, STATE_FILE
from dpo_dist.train.disk import reporting_full_disk, tensor_bytes, tree_bytes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed into this run; the message names it and the likely cause."""


@dataclass
class TrainState:
    global_step: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    # The divergence guard's (dpo_dist.train.checks.watch_divergence): the run's first loss, and the first step of the
    # signs of divergence seen in a row up to now (None: the last step showed none).
    start_loss: float | None = None
    diverging_since: int | None = None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_FOLDER.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def adapter_only_checkpoints(accelerator: Any, model: Any) -> None:
    """Store only trainable weights in checkpoints of a LoRA policy; check on load that the file holds exactly them.

    ``model`` is what ``prepare`` returned (the DDP wrapper with 2+ processes), while Accelerate saves and loads the
    entries of ``accelerator._models`` (the unwrapped model, in Accelerate 1.15): the policy is found among them by
    identity after unwrapping, and the trainable names are taken from that entry, so they match its state dict keys
    with or without a ``module.`` prefix."""
    policy = accelerator.unwrap_model(model)

    def trainable(m: Any) -> set[str]:
        return {name for name, p in m.named_parameters() if p.requires_grad}

    def is_policy(m: Any) -> bool:
        return accelerator.unwrap_model(m) is policy

    def keep_trainable(models: list, weights: list, output_dir: str) -> None:
        for i, m in enumerate(models):
            if is_policy(m):
                names = trainable(m)
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def check_file(models: list, input_dir: str) -> None:
        from safetensors import safe_open

        (entry,) = [m for m in models if is_policy(m)]
        expected = trainable(entry)
        path = os.path.join(input_dir, "model.safetensors")
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
        if keys != expected:
            raise CheckpointError(
                f"{path} holds {len(keys)} tensors, the policy has {len(expected)} trainable ones: "
                "the checkpoint was written by another model or LoRA setup"
            )

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(check_file)


class _TiedWeightsNotice(logging.Filter):
    """Drops Accelerate's "Removed shared tensor {'lm_head.weight'} while saving" (a warning at every checkpoint of a
    model with tied embeddings). safetensors stores a shared tensor once, and ``load_state`` reads the checkpoint back
    into this same, still tied, model, so nothing is lost: the resume tests compare whole trajectories."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in str(record.msg)  # Accelerate may prefix "[RANK 0] "


@contextlib.contextmanager
def without_tied_weights_notice() -> Iterator[None]:
    logger = logging.getLogger("accelerate.utils.other")
    quiet = _TiedWeightsNotice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def save_checkpoint(accelerator: Any, output_dir: str, state: TrainState, *, keep_last: int | None,
                    adapter_only: bool = False) -> str:
    """Write ``checkpoint-<step>`` atomically (all processes call this), then prune old ones (never the best;
    ``keep_last=None``: none). A full disk is :class:`~dpo_dist.train.disk.DiskFullError`, the ``.tmp`` removed.
    ``adapter_only`` (LoRA) under DeepSpeed leaves the frozen weights out of its checkpoint (without DeepSpeed the
    hooks of :func:`adapter_only_checkpoints` do it).

    Once all have written, every process fsyncs every file (on a shared file system each node flushes what it wrote);
    the main process then writes ``trainer_state.json``, fsyncs it and every folder of the checkpoint, renames it into
    place and fsyncs the output folder: a crash or power loss leaves the whole checkpoint or none. The best is
    recognised by its step, not its path string (a resumed run may spell ``output_dir`` differently)."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    with reporting_full_disk(final, tmp, needed=lambda: _checkpoint_bytes(accelerator, output_dir, adapter_only),
                             then=lambda: _resume_hint(output_dir)):
        with without_tied_weights_notice():
            accelerator.save_state(tmp, **({"exclude_frozen_parameters": True} if deepspeed and adapter_only else {}))
        accelerator.wait_for_everyone()
        _fsync_tree(tmp, files=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(asdict(state), handle, indent=1)
            _fsync(os.path.join(tmp, STATE_FILE))
            _fsync_tree(tmp, files=False)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
    if accelerator.is_main_process:
        _fsync(output_dir)
        found = list_checkpoints(output_dir)
        kept = found if keep_last is None else found[-keep_last:]
        keep = {step for step, _ in kept} | {state.global_step, checkpoint_step(state.best_checkpoint)}
        for step, path in found:
            if step not in keep:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_bytes(accelerator: Any, output_dir: str, adapter_only: bool) -> tuple[int, str]:
    """About what a checkpoint takes: the size of the latest one, or before the first, the weights it stores (the
    trainable ones for LoRA) and the optimizer's state."""
    found = list_checkpoints(output_dir)
    if found:
        return tree_bytes(found[-1][1]), f"the size of {os.path.basename(found[-1][1])}"
    total = 0
    for model in getattr(accelerator, "_models", []):
        total += tensor_bytes(p for p in model.parameters() if p.requires_grad or not adapter_only)
    for optimizer in getattr(accelerator, "_optimizers", []):
        inner = getattr(optimizer, "optimizer", optimizer)
        for values in getattr(inner, "state", {}).values():
            total += tensor_bytes(v for v in values.values() if hasattr(v, "element_size"))
    return total, "the weights and optimizer state to store"


def _resume_hint(output_dir: str) -> str:
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return "no checkpoint is complete yet; free space and run the same command again (it starts over)"
    return f"the last complete checkpoint is {latest}; free space and run the same command again to resume from it"


def checkpoint_step(path: str | None) -> int | None:
    """The step of a ``checkpoint-<step>`` path (any spelling of the folder it is in), or None."""
    match = CHECKPOINT_FOLDER.match(os.path.basename(os.path.normpath(path))) if path else None
    return int(match.group(1)) if match else None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str, *, files: bool) -> None:
    """fsync every file under ``root`` (``files``), or every folder, ``root`` included (their entries)."""
    for folder, _, names in os.walk(root, topdown=False):
        if not files:
            _fsync(folder)
            continue
        for name in names:
            _fsync(os.path.join(folder, name))


def remove_partial_writes(output_dir: str) -> list[str]:
    """Delete what a run killed in the middle of a write left behind (``checkpoint-<step>.tmp``, ``model.tmp``); the
    names removed. Call on the main process before anything is written."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        partial = name == "model.tmp" or (name.endswith(".tmp") and CHECKPOINT_FOLDER.match(name[: -len(".tmp")]))
        if partial and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
    return removed


ABANDONED = "abandoned"
DIVERGED = "diverged"  # checkpoints of a run the divergence guard stopped, from the step before the signs began


def set_aside_later_checkpoints(output_dir: str, step: int, into: str = ABANDONED) -> list[str]:
    """Move the checkpoints past ``step`` (the step this run starts from) into ``<output_dir>/abandoned/``: they belong
    to a run that went further and is not continued (a resume from an older checkpoint, or train.resume=never), and
    left in place they would outrank this run's own checkpoints (latest, kept last). ``into``: another folder
    (``diverged/``: checkpoints of weights that had diverged). Returns the names moved. Main process only."""
    later = [(s, path) for s, path in list_checkpoints(output_dir) if s > step]
    if not later:
        return []
    aside = os.path.join(output_dir, into)
    os.makedirs(aside, exist_ok=True)
    for _, path in later:
        target = os.path.join(aside, os.path.basename(path))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(path, target)
    _fsync(output_dir)
    return [os.path.basename(path) for _, path in later]


def load_checkpoint(accelerator: Any, path: str, *, adapter_only: bool) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states. A full model's weights must match the checkpoint key for
    key (strict): a checkpoint written by another model, or by a run with another number of processes (DDP stores
    ``module.``-prefixed keys), is an error, never a silent restart from the initial weights."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        # DeepSpeed's own checkpoint format, every rank its shards; a LoRA one holds only the trainable weights
        accelerator.load_state(path, **({"custom_load_fn": _load_trainable(path)} if adapter_only else {}))
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


def _load_trainable(path: str) -> Any:
    """DeepSpeed's ``custom_load_fn`` for a LoRA checkpoint: its module weights must be the trainable ones. DeepSpeed
    leaves frozen weights out by parameter, so a frozen weight tied to another (an output layer tied to the
    embeddings) stays in under its second name: those are allowed, nothing else."""

    def load(src: dict, dst: Any) -> None:
        params = dict(dst.named_parameters(remove_duplicate=False))
        expected = {name for name, p in params.items() if p.requires_grad}
        keys = set(src) - {name for name, _ in dst.named_buffers()}
        if expected - keys or keys - expected - {name for name, p in params.items() if not p.requires_grad}:
            raise CheckpointError(
                f"{path} holds {len(keys)} weights, the policy has {len(expected)} trainable ones: the checkpoint was "
                "written by another model or LoRA setup"
            )
        dst.load_state_dict(src, strict=False)

    return load


def record_start(accelerator: Any, model: Any, output_dir: str, resume_from: str | None) -> Any:
    """For a policy whose initialization moved part of its base into the adapter (PiSSA, OLoRA): record its initial
    adapter and the digest of its residual base in ``output_dir`` (the export converts the adapter with them); before
    that, for a resume from the checkpoint ``resume_from``, check that the residual rebuilt now is the one its run
    recorded, bit for bit, or stop with a :class:`CheckpointError` on every process (the checkpoint's adapter would
    sit on other base weights). Returns the :class:`~dpo_dist.model.adapters.Start` on the main process (None
    elsewhere, and for other policies). Call it before the reference log-probs are computed (their cache key includes
    the digest)."""
    from accelerate.utils import broadcast_object_list

    from dpo_dist.model.adapters import check_start, mutates_base, save_start, starting_model

    if not mutates_base(model):
        return None
    start = problem = None
    if accelerator.is_main_process:
        start = starting_model(model)
        problem = check_start(start, os.path.dirname(os.path.normpath(resume_from))) if resume_from else None
        if problem is None:
            save_start(start, output_dir)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise CheckpointError(problem)
    return start


def _read_state(path: str) -> TrainState:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        return TrainState(**json.load(handle))


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a training checkpoint (it has the trainer's state file)."""
    return os.path.isfile(os.path.join(path, STATE_FILE))
