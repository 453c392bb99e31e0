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

Each checkpoint ends with ``manifest.json``: every file in it, every rank's shards included, with its size and SHA-256
(``sha256sum`` reads the same digests). A resume checks the checkpoint against it first (:func:`resume_point`): a
damaged newest one (a truncated or altered file, a file or the manifest gone) is named in one line, with the file and
what was expected and found, moved to ``damaged/``, and the run resumes from the newest one that checks out. A
checkpoint from before manifests is resumed unchecked, with a line that says so.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Iterator

from dpo_dist.config import CHECKPOINT_FOLDER, STATE_FILE
from dpo_dist.distributed import say
from dpo_dist.train.disk import reporting_full_disk, tensor_bytes, tree_bytes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed into this run; the message names it and the likely cause."""


@dataclass
class TrainState:
    global_step: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    pairs_seen: int = 0  # the position in the data: steps x the global batch (dpo_dist.train.shape)
    shape: dict | None = None  # the Shape (processes, batch split, engine) the checkpoint was written with
    # The divergence guard's (dpo_dist.train.checks.watch_divergence): the run's first loss, and the first step of the
    # signs of divergence seen in a row up to now (None: the last step showed none).
    start_loss: float | None = None
    diverging_since: int | None = None


MANIFEST = "manifest.json"
# The process checks run in outside training (an export), standing in for the Accelerator of the collectives.
ALONE = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1)
CHECKSUM = "sha256"  # hashlib with SHA-NI: about 1.2 GB/s on one core, beside blake2b's 0.7 (docs/troubleshooting.md)
DAMAGED = "damaged"


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

        entries = [m for m in models if is_policy(m)]
        if not entries:  # an FSDP2 checkpoint read whole (_load_fsdp_shards_whole): its shards hold every weight
            return
        (entry,) = entries
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
    the main process then writes ``trainer_state.json``, the processes describe every file (:func:`write_manifest`),
    the main process writes ``manifest.json`` last, fsyncs every folder of the checkpoint, renames it into place and
    fsyncs the output folder: a crash or power loss leaves the whole checkpoint or none. The best is recognised by
    its step, not its path string (a resumed run may spell ``output_dir`` differently)."""
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
                json.dump({**asdict(state), "manifest": MANIFEST}, handle, indent=1)
            _fsync(os.path.join(tmp, STATE_FILE))
        write_manifest(accelerator, tmp)
        if accelerator.is_main_process:
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


def write_manifest(accelerator: Any, folder: str) -> None:
    """``folder/manifest.json``: every file under ``folder`` (path, size, SHA-256), written atomically by the main
    process. All processes call this once every file is written and fsynced.

    The main process lists the files (it sees the folder as the rename will publish it: every rank's shards, on the
    shared file system a multi-node checkpoint needs anyway) and each process hashes a share of them, so that the
    time it takes is divided by the number of processes, as writing the shards was; a process that could not see a
    file another wrote would make it an error here, at the save, not at the resume."""
    from accelerate.utils import broadcast_object_list

    names = [_files_under(folder) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        names = broadcast_object_list(names)
    files = _describe_files(accelerator, folder, names[0])
    if accelerator.is_main_process:
        tmp = os.path.join(folder, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"checksum": CHECKSUM, "files": files}, handle, indent=1)
        _fsync(tmp)
        os.replace(tmp, os.path.join(folder, MANIFEST))
        _fsync(os.path.join(folder, MANIFEST))  # clean already: for a reader of the fsyncs, every file under its name


def _files_under(folder: str) -> list[str]:
    """The files under ``folder``, as sorted paths relative to it, the manifest left out."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in names]
    return sorted(name for name in found if name not in (MANIFEST, MANIFEST + ".tmp"))


def _describe_files(accelerator: Any, folder: str, names: list[str]) -> dict[str, dict]:
    """``{name: {"size": bytes, CHECKSUM: hex}}`` (``None`` for a file not there), each process hashing every
    N-th file; every process gets the whole. A collective under several processes."""
    mine = {name: _describe(os.path.join(folder, name))
            for name in names[accelerator.process_index::accelerator.num_processes]}
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return {name: described for part in gather_object([mine]) for name, described in part.items()}


def _describe(path: str) -> dict | None:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return {"size": size, CHECKSUM: hashlib.file_digest(handle, CHECKSUM).hexdigest()}
    except FileNotFoundError:
        return None


def verify_checkpoint(accelerator: Any, path: str) -> tuple[str | None, bool]:
    """What is wrong with the checkpoint at ``path`` (one phrase naming the file and what was expected and found), or
    None; and whether it had a manifest to check against (one written before manifests had none: ``(None,
    False)``). A collective: every process calls it with the same path and gets the same answer."""
    from accelerate.utils import broadcast_object_list

    listed = [_read_manifest(path) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        listed = broadcast_object_list(listed)
    manifest, problem = listed[0]
    if problem or manifest is None:
        return problem, manifest is not None or problem is not None
    expected = manifest["files"]
    found = _describe_files(accelerator, path, sorted(expected))
    problems = [_difference(name, want, found[name]) for name, want in expected.items()]
    problems = [p for p in problems if p]
    if not problems:
        return None, True
    more = f" (and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return problems[0] + more, True


def _read_manifest(path: str) -> tuple[dict | None, str | None]:
    """(the manifest, None); (None, what is wrong); or (None, None) for a checkpoint written before manifests. The
    state file of a checkpoint that has a manifest says so, so a manifest gone from it (a copy that did not finish)
    is told apart from one never written."""
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError) as error:
            size = _size(os.path.join(path, STATE_FILE))
            return None, f"{STATE_FILE} cannot be read ({size} bytes, {type(error).__name__}) and {MANIFEST} is missing"
        if isinstance(state, dict) and state.get("manifest"):
            return None, (f"{MANIFEST} is missing, though {STATE_FILE} says one was written (a save or a copy that did "
                          "not finish)")
        return None, None
    try:
        with open(file, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("checksum") != CHECKSUM or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"no {CHECKSUM} file list")
    except (OSError, ValueError, AttributeError) as error:
        return None, f"{MANIFEST} cannot be read ({error})"
    return manifest, None


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _difference(name: str, want: dict, found: dict | None) -> str | None:
    if found is None:
        return f"{name} is missing"
    if found["size"] != want["size"]:
        return f"{name} is {found['size']} bytes, the manifest says {want['size']}"
    if found[CHECKSUM] != want[CHECKSUM]:
        return (f"{name} has {CHECKSUM} {found[CHECKSUM][:12]}..., the manifest says {want[CHECKSUM][:12]}... (the "
                "same size: its bytes changed)")
    return None


def resume_point(accelerator: Any, output_dir: str, resume: str) -> str | None:
    """The checkpoint to resume from for ``train.resume`` (``auto``, ``never`` or a checkpoint folder), checked
    against its manifest. ``auto``: the newest that checks out; each newer one that does not is moved to
    ``<output_dir>/damaged/`` and named in one line with what is wrong. A folder given that does not check out is a
    :class:`CheckpointError`. A checkpoint written before manifests is taken unchecked, with a line saying so. All
    processes call this (the checks are collectives)."""
    from accelerate.utils import broadcast_object_list

    from dpo_dist.distributed import say

    if resume == "never":
        return None
    if resume != "auto":
        problem, checked = verify_checkpoint(accelerator, resume)
        if problem:
            raise CheckpointError(f"{resume} is damaged: {problem}; give another checkpoint in train.resume, or "
                                  "train.resume=auto for the newest good one")
        if not checked:
            say(accelerator, _unchecked(resume))
        return resume
    found = [list_checkpoints(output_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        found = broadcast_object_list(found)
    damaged, chosen = [], None
    for _, path in reversed(found[0]):
        problem, checked = verify_checkpoint(accelerator, path)
        if problem is None:
            chosen = path
            if not checked:
                say(accelerator, _unchecked(path))
            break
        damaged.append((path, problem))
        if accelerator.is_main_process:
            _move_aside(output_dir, path)
    accelerator.wait_for_everyone()
    then = (f"resuming from {os.path.basename(chosen)} instead" if chosen
            else "no good checkpoint is left: starting from step 0")
    for path, problem in damaged:
        say(accelerator, f"{os.path.basename(path)} is damaged: {problem}; moved to "
                         f"{os.path.join(output_dir, DAMAGED)}/, {then}")
    return chosen


def _unchecked(path: str) -> str:
    return (f"{path} has no {MANIFEST} (written before checkpoints recorded their files): resuming from it without "
            "checking it")


def _move_aside(output_dir: str, path: str) -> str:
    """Move a damaged checkpoint into ``<output_dir>/damaged/`` (a name taken there gets ``.2``, ``.3``...)."""
    aside = os.path.join(output_dir, DAMAGED)
    os.makedirs(aside, exist_ok=True)
    target, n = os.path.join(aside, os.path.basename(path)), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(aside, f"{os.path.basename(path)}.{n}")
    os.replace(path, target)
    _fsync(output_dir)
    return target


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


def written_by(path: str) -> int:
    """How many processes wrote a checkpoint: Accelerate stores each one's RNG states (``random_states_<rank>.pkl``)."""
    return len(glob.glob(os.path.join(path, "random_states_*.pkl")))


def load_checkpoint(accelerator: Any, path: str, *, adapter_only: bool) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states. A full model's weights must match the checkpoint key for
    key (strict): a checkpoint written by another model is an error, never a silent restart from the initial weights.
    One process and DDP store the same keys (Accelerate saves the unwrapped model), so either resumes the other's
    checkpoints; which shapes resume which: :mod:`dpo_dist.train.shape`, checked before this."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        # DeepSpeed's own checkpoint format, every rank its shards; a LoRA one holds only the trainable weights
        kwargs = {"custom_load_fn": _load_trainable(path)} if adapter_only else {}
        if written_by(path) == accelerator.num_processes:
            accelerator.load_state(path, **kwargs)
        else:
            _load_deepspeed_resharded(accelerator, path, **kwargs)
        return _at_step_boundary(accelerator, path)
    fsdp = getattr(accelerator.state, "fsdp_plugin", None) is not None
    if holds_fsdp_shards(path) and not fsdp:
        _load_fsdp_shards_whole(accelerator, path)  # one process: the shards of every rank, put together
        return _at_step_boundary(accelerator, path)
    if fsdp and not holds_fsdp_shards(path):
        _load_whole_into_fsdp(accelerator, path)  # one process's files, each rank taking its shard
        return _at_step_boundary(accelerator, path)
    try:  # adapter-only files hold a subset of the keys; the pre-hook checks them exactly
        accelerator.load_state(path, strict=not adapter_only)
    except CheckpointError:
        raise
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not fit this model: {str(error).splitlines()[0]} (was it written by another model? resume "
            "with the model it was written with, or set train.resume=never)"
        ) from error
    return _at_step_boundary(accelerator, path)


DEEPSPEED_MODEL = "pytorch_model"  # Accelerate's folder (DeepSpeed's tag) for the policy's DeepSpeed checkpoint
UNIVERSAL = "universal"  # in a DeepSpeed checkpoint: its shards made loadable on any process count, made on demand


def holds_deepspeed_shards(path: str) -> bool:
    """Whether the checkpoint ``path`` was written under DeepSpeed: its engine's folder of per-rank shards."""
    return os.path.isdir(os.path.join(path, DEEPSPEED_MODEL))


def _load_deepspeed_resharded(accelerator: Any, path: str, **kwargs: Any) -> None:
    """A DeepSpeed checkpoint written by another number of processes, through DeepSpeed's universal checkpoint: each
    parameter's fp32 weights and Adam moments put together from every rank's flat partitions
    (``deepspeed.checkpoint.ds_to_universal``, run once by the main process into ``<checkpoint>/universal``) and loaded
    by each rank as the slice its partition holds now (the engine's ``load_universal_checkpoint``). The schedule, the
    step count and the RNG states (rank 0's for any rank the checkpoint lacks) come from Accelerate's ``load_state``
    as for any checkpoint."""
    import time

    engine = accelerator._models[0]
    folder = os.path.join(path, UNIVERSAL)
    if accelerator.is_main_process and not os.path.isdir(folder):
        start = time.perf_counter()
        _to_universal(os.path.join(path, DEEPSPEED_MODEL), folder)
        writers = written_by(path)
        say(accelerator, f"{os.path.basename(path)}: the DeepSpeed shards of {writers} process{'es' * (writers > 1)} put together for "
                    f"{accelerator.num_processes} (DeepSpeed's universal checkpoint, {folder}, "
                    f"{time.perf_counter() - start:.1f} s)")
    accelerator.wait_for_everyone()
    engine._config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(folder, DEEPSPEED_MODEL, **kwargs)
    finally:
        engine._config.load_universal_checkpoint = False
    _load_all_but_model_and_optimizer(accelerator, path)


def _to_universal(shards: str, folder: str) -> None:
    """DeepSpeed's ``ds_to_universal`` from the checkpoint's ``shards`` into ``folder``, written beside it first and
    renamed when whole; what the converter prints is kept for its error. Our checkpoints carry no Megatron
    ``universal_checkpoint_info``; the converter's ``inject_missing_state`` adds the version record it wants, which is
    all a model without tensor or pipeline parallelism needs. One worker for each of its passes: an extracting worker
    holds a rank's optimizer shards in memory, and its process pool with two merging workers hung here (SmolLM2-135M,
    deepspeed 0.19.8); one worker converts that checkpoint in about 40 s, 1.5 GiB at most."""
    import argparse
    import io

    from deepspeed.checkpoint.ds_to_universal import main

    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=shards, output_folder=os.path.join(tmp, DEEPSPEED_MODEL),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            main(args)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{os.path.dirname(shards)}: DeepSpeed's universal checkpoint conversion failed "
                              f"({type(error).__name__}: {error}); resume it on the process count that wrote it, or "
                              f"start over with train.resume=never. The converter said:\n{said.getvalue()[-2000:]}"
                              ) from error
    _fsync_tree(tmp, files=True)
    os.replace(tmp, folder)
    _fsync(os.path.dirname(folder))


FSDP_MODEL, FSDP_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # Accelerate's torch.distributed.checkpoint folders


def holds_fsdp_shards(path: str) -> bool:
    """Whether the checkpoint ``path`` was written under FSDP2: its weights and optimizer state as
    ``torch.distributed.checkpoint`` folders, a file per rank and a ``.metadata`` that says which slice each holds."""
    return os.path.isdir(os.path.join(path, FSDP_MODEL))


def read_sharded(folder: str, key: str, template: dict[str, Any]) -> dict[str, Any]:
    """The ``torch.distributed.checkpoint`` folder ``folder`` (saved as ``{key: state}``) read into ``template``, a
    state dict of whole tensors with the same names: each tensor is filled from the slices every rank wrote, so the
    shards of N processes become the tensors of one, bit for bit. Without a process group it reads in this process
    alone (``torch.distributed.checkpoint.load``'s ``no_dist``); a name the checkpoint lacks is an error."""
    import warnings

    import torch.distributed.checkpoint as dcp

    loaded = {key: template}
    with warnings.catch_warnings():  # what is meant here, said at every call
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(folder))
    return loaded[key]


def _load_fsdp_shards_whole(accelerator: Any, path: str) -> None:
    """An FSDP2 checkpoint (any number of ranks) into this one process's unsharded policy and optimizer: the weights
    and AdamW moments resharded into whole tensors (:func:`read_sharded`), through torch's
    ``get/set_model_state_dict`` and ``get/set_optimizer_state_dict``, the functions Accelerate's FSDP2 save and load
    use, so the names are the ones they wrote (parameter names, not optimizer indices). Then Accelerate's
    ``load_state`` for the rest (the schedule, the RNG states of rank 0, the step count), with its model and optimizer
    lists left empty for the call: it would look for ``model.safetensors`` and ``optimizer.bin``, which FSDP2 does not
    write."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    (model,), (optimizer,) = accelerator._models, accelerator._optimizers
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    try:
        weights = read_sharded(os.path.join(path, FSDP_MODEL), "model", get_model_state_dict(model))
        set_model_state_dict(model, weights)
        moments = read_sharded(os.path.join(path, FSDP_OPTIMIZER), "optimizer", get_optimizer_state_dict(model, inner))
        set_optimizer_state_dict(model, inner, moments)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{path} does not fit this model: {str(error).strip().splitlines()[0]} (was it written by another model? "
            "resume with the model it was written with, or set train.resume=never)"
        ) from error
    _load_all_but_model_and_optimizer(accelerator, path)


def _load_all_but_model_and_optimizer(accelerator: Any, path: str) -> None:
    """Accelerate's ``load_state`` for what a checkpoint holds besides the policy and its optimizer (the scheduler, the
    RNG states), whose weights and moments the caller has loaded itself: Accelerate's lists of them hidden meanwhile."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        accelerator.load_state(path)
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def _load_whole_into_fsdp(accelerator: Any, path: str) -> None:
    """A one-process checkpoint of a full fine-tune (``model.safetensors``, ``optimizer.bin``) into FSDP2's sharded
    policy and optimizer: every rank reads the whole files and keeps its shard (torch's ``set_model_state_dict`` and
    ``set_optimizer_state_dict`` with ``full_state_dict``). The optimizer state numbers the parameters in the order
    of its parameter groups, which FSDP2 keeps (it shards each parameter in place): the numbers become the names
    torch's functions expect. A weight tied to another (the output layer) is stored once and may be missing; any
    other difference is an error. Then :func:`_load_all_but_model_and_optimizer`."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    (model,), (optimizer,) = accelerator._models, accelerator._optimizers
    inner = getattr(optimizer, "optimizer", optimizer)
    whole = StateDictOptions(full_state_dict=True, strict=False)
    weights = load_file(os.path.join(path, "model.safetensors"))
    names = {id(p): name for name, p in model.named_parameters()}  # a tied weight under its first name, as torch's
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(names.values())
    found = set(weights)
    expected = set(model.state_dict())
    if found - expected or expected - found - tied:
        odd = sorted((found - expected) | (expected - found - tied))
        raise CheckpointError(f"{path} does not fit this model ({len(odd)} weights differ, e.g. {odd[0]}): was it "
                              "written by another model? resume with the model it was written with, or set "
                              "train.resume=never")
    set_model_state_dict(model, weights, options=whole)
    saved = torch.load(os.path.join(path, "optimizer.bin"), map_location="cpu", weights_only=True)
    order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
    numbered = [i for group in saved["param_groups"] for i in group["params"]]
    if len(numbered) != len(order):
        raise CheckpointError(f"{path}/optimizer.bin holds the state of {len(numbered)} parameters, this policy trains "
                              f"{len(order)}: was it written by another model? or set train.resume=never")
    fqn = dict(zip(numbered, order))
    moments = {"state": {fqn[i]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [fqn[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, inner, moments, options=StateDictOptions(full_state_dict=True))
    _load_all_but_model_and_optimizer(accelerator, path)


def _at_step_boundary(accelerator: Any, path: str) -> TrainState:
    """The checkpoint's state, with Accelerate's micro-step counter back at an optimizer-step boundary.

    A checkpoint is written between optimizer steps, but ``load_state`` restores ``accelerator.step``, the micro-steps
    the writing run took (its steps x its accumulation): a run resumed with another accumulation (fewer processes
    keeping the global batch, another per-device batch) then syncs and steps the optimizer in the middle of its
    micro-batches, ``step % accumulation`` of them early, on another trajectory. Every step starts at 0."""
    accelerator.step = 0
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
        values = json.load(handle)
    values.pop("manifest", None)  # that the checkpoint has one (verify_checkpoint)
    return TrainState(**values)


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a training checkpoint (it has the trainer's state file)."""
    return os.path.isfile(os.path.join(path, STATE_FILE))
