"""Why a run stops: combinations that cannot work, refused at start, and the error the loop stops with."""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import torch

from dpo_dist.config import (Config, ConfigChange, ConfigError, config_changes, lora_engine_refusal, resume_refusal,
                             saved_config)
from dpo_dist.model.builtin import cache_root
from dpo_dist.model.load import resolve_source
from dpo_dist.train import reference_cache
from dpo_dist.train.checkpoint import DIVERGED, TrainState, latest_checkpoint, list_checkpoints, set_aside_later_checkpoints
from dpo_dist.train.disk import unwritable
from dpo_dist.train.metrics import is_finite

LAUNCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    if stage == 3 or fsdp:
        refused = lora_engine_refusal(cfg.lora, "FSDP2" if fsdp else "DeepSpeed ZeRO-3")
        if refused:
            raise TrainingError(refused)


def check_output_locations(cfg: Config, accelerator: Any) -> None:
    """Every folder the run will write, made if missing and written to now, before the model loads and the reference
    log-probs are computed: ``train.output_dir`` on every process (each writes its part of a checkpoint), the reference
    cache (precomputed mode) and the built-in data set's cache on the main process. A :class:`ConfigError` naming the
    folder and the setting that moves it, on every process."""
    places = [("train.output_dir", cfg.train.output_dir, "train.output_dir")]  # (what, folder, the setting)
    if accelerator.is_main_process and cfg.reference.mode == "precomputed":
        places.append(("reference.cache_dir", cfg.reference.cache_dir or reference_cache.default_cache_dir(),
                       "reference.cache_dir"))
    if accelerator.is_main_process and cfg.data.uses_sentiment():
        places.append(("the built-in data set's cache", os.path.join(cache_root(), "data"), "XDG_CACHE_HOME"))
    problem = None
    for what, folder, setting in places:
        why = unwritable(folder)
        if why:
            problem = f"{what}: {folder} cannot be written ({why}); set {setting} to a writable folder"
            break
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problem = next((p for p in gather_object([problem]) if p), None)
    if problem:
        raise ConfigError(problem)


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


def check_step(step: int, record: dict[str, float], *, applied: bool, loss_scaling: bool, cfg: Config) -> str | None:
    """None for a step whose loss and gradient norm are finite.

    A finite loss whose fp16 gradients overflowed, the update skipped by the loss scaler (a GradScaler, or
    DeepSpeed's), is routine: the scale is lowered and training goes on; returns a line saying so. Anything else
    non-finite raises :func:`non_finite_error`, saying whether the update was applied: the loop checks the loss before
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
    raise non_finite_error(cfg, step, record, applied=applied)


def non_finite_error(cfg: Config, step: int, record: dict[str, float], *, applied: bool) -> TrainingError:
    """The error a non-finite loss or gradient norm stops the run with: which of them, whether the update was applied,
    and what is left to resume from. The last checkpoint may already hold diverged weights: a learning rate far too
    high blows the weights up a step or more before the loss or gradient turns non-finite (lr 1e6 on the tiny test
    model: every weight moves by 1e6 at step 1, the gradient is NaN at step 2), and a rerun would resume from it and
    fail the same way. So the message gives its largest |weight| (beside the starting model's, for full fine-tuning
    from a local folder), says so, and gives the way out."""
    if not math.isfinite(record["loss"]):  # checked first: the step stopped before its backward, no gradient yet
        numbers = f"loss={record['loss']:.6g}; the step stopped before its backward, so no gradient norm"
        bad = "loss"
    else:
        numbers = f"loss={record['loss']:.6g}, grad_norm={record['grad_norm']:.6g}"
        bad = "grad_norm"
    head = (f"non-finite {bad} at step {step} ({numbers}): "
            + ("DeepSpeed applied this update before it could be checked (its overflow check is off, e.g. "
               "bf16.check_grad_overflow=false), so the weights in memory are not finite and the run stops without "
               "saving them" if applied else "stopped before applying it"))
    t = cfg.train
    found = [path for _, path in list_checkpoints(t.output_dir)]
    if not found:
        return TrainingError(f"{head}; no checkpoint was written (set train.save_every to keep some); lower "
                             f"train.learning_rate (now {t.learning_rate:g})")
    last, earlier = found[-1], found[:-1]
    largest = largest_weight(last)  # nan or inf if any weight is
    weights = ""
    if largest is not None:
        start = None if cfg.lora.enabled else largest_weight(resolve_source(cfg.model.name_or_path))
        weights = (f" (largest |weight| {largest:.3g}"
                   + (f"; the starting model's: {start:.3g})" if start is not None else ")"))
    return TrainingError(
        f"{head}. Last checkpoint: {last}{weights}; if it has diverged already, a rerun resumes from it "
        f"(train.resume=auto) and fails the same way, even with a lower learning rate: start over with "
        f"train.resume=never and a lower train.learning_rate (now {t.learning_rate:g}), or resume from an earlier "
        f"checkpoint with train.resume=<path> ({'kept: ' + ', '.join(earlier) if earlier else 'none earlier is kept'})"
    )


def largest_weight(folder: str) -> float | None:
    """The largest |value| over the ``*.safetensors`` weights in ``folder`` (NaN if any is NaN; inf if any is
    infinite), read one tensor at a time; None if the folder has none (a Hub id, a DeepSpeed checkpoint)."""
    from safetensors import safe_open

    largest = None
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.numel() and tensor.is_floating_point():
                    value = float(tensor.abs().max())  # NaN if any element is NaN
                    if not math.isfinite(value):
                        return value
                    largest = value if largest is None else max(largest, value)
    return largest


def resumed_run_folder(cfg: Config) -> str | None:
    """The folder of the run this one continues (whose config.yaml it is compared with): ``train.output_dir`` when
    ``train.resume=auto`` finds a checkpoint there, the folder above ``train.resume=<path>``; None for a run that
    starts over."""
    t = cfg.train
    if t.resume == "never":
        return None
    if t.resume == "auto":
        return t.output_dir if latest_checkpoint(t.output_dir) else None
    return os.path.dirname(os.path.normpath(t.resume))


def check_resume_changes(cfg: Config, accelerator: Any) -> tuple[list[ConfigChange], str | None]:
    """Before anything is loaded: the keys a resume changes against the config of the run it continues
    (:data:`~dpo_dist.config.RESUME_RULES`), and that run's folder. A change that cannot be taken mid-run is a
    :class:`ConfigError` on every process, in one line naming each key and what to do. The main process reads and
    decides (it alone then rewrites config.yaml); the others get its answer and the changes. Returns ([], None) for a run that starts
    over or whose folder has no config.yaml."""
    changes: list[ConfigChange] = []
    folder = resumed_run_folder(cfg)
    problem = None
    if accelerator.is_main_process and folder is not None:
        try:
            old = saved_config(folder)
        except ConfigError as error:  # written by another version of dpo-dist: say so, and that nothing is compared
            old, problem = None, (f"{error}: the config of the run being resumed does not load, so a resume cannot "
                                  "tell what it changes; start a new run in another train.output_dir, or fix the file")
        if old is not None:
            changes = config_changes(old, cfg)
            problem = resume_refusal(changes, folder)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem, changes = broadcast_object_list([problem, changes])  # every process resumes with the same shape
    if problem:
        raise ConfigError(problem)
    return changes, folder


LN2 = math.log(2.0)


def divergence_signs(record: dict[str, float], lr: float, state: TrainState, cfg: Config) -> list[str]:
    """What in a step's record (its loss and gradient norm, finite, at learning rate ``lr``) says the run is
    diverging: a loss above train.divergence_loss_factor x max(the run's first loss, ln 2) (ln 2 is where DPO's
    sigmoid loss starts; the floor keeps a run whose first batch happened to score low, a reference-free loss,
    from being stopped by noise), or a gradient norm of exactly 0 while the learning rate is not (a model that no
    longer moves; a loss of exactly 0 with it is a hinge loss met by every pair, not a failure). Empty: none."""
    t, signs = cfg.train, []
    loss, grad_norm = record["loss"], record["grad_norm"]
    if t.divergence_loss_factor is not None and state.start_loss is not None:
        level = max(state.start_loss, LN2)
        if loss > t.divergence_loss_factor * level:
            signs.append(f"loss {loss:.4g} above {t.divergence_loss_factor:g} x {level:.4g} (train.divergence_loss_"
                         f"factor x max(the first step's loss {state.start_loss:.4g}, ln 2))")
    if grad_norm == 0.0 and lr > 0.0 and loss != 0.0:
        signs.append(f"grad_norm exactly 0 at lr {lr:g}")
    return signs


def watch_divergence(accelerator: Any, model: Any, state: TrainState, step: int, record: dict[str, float], lr: float,
                     cfg: Config) -> TrainingError | None:
    """The divergence guard, at each step whose loss and gradient norm are finite (before the step is logged or
    checkpointed): keeps the run's first loss and the streak of steps showing :func:`divergence_signs` in ``state``
    (so a resume continues the count), and once the streak reaches train.divergence_patience steps, moves the
    checkpoints of the weights that gave the first of them (from the step before it on) to ``<output_dir>/diverged/``
    and returns the error the run stops with (every process decides alike: the figures are reduced over all)."""
    t = cfg.train
    if state.start_loss is None:
        state.start_loss = record["loss"]
    if t.divergence_patience is None:
        return None
    signs = divergence_signs(record, lr, state, cfg)
    if not signs:
        state.diverging_since = None
        return None
    since = state.diverging_since = state.diverging_since or step
    if step - since + 1 < t.divergence_patience:
        return None
    moved = []
    if accelerator.is_main_process:
        moved = set_aside_later_checkpoints(t.output_dir, since - 2, into=DIVERGED)
    accelerator.wait_for_everyone()
    largest = largest_trainable(model)
    weights = f"; largest trainable |weight| {largest:.3g}" if largest is not None else ""
    aside = (f"{', '.join(moved)} (from step {since - 1}, whose weights gave the first of them) moved to "
             f"{os.path.join(t.output_dir, DIVERGED)}/; " if moved else "")
    kept = latest_checkpoint(t.output_dir)
    way_out = (f"the last checkpoint from before it is {kept}: run again with a lower train.learning_rate (now "
               f"{t.learning_rate:g}) to resume from it at that rate" if kept else
               "no checkpoint from before it is kept: start over with train.resume=never and a lower "
               f"train.learning_rate (now {t.learning_rate:g})")
    return TrainingError(
        f"diverged at step {step}: {' and '.join(signs)}, for {step - since + 1} steps in a row (since step {since}; "
        f"train.divergence_patience={t.divergence_patience}){weights}; stopped without saving this state or exporting "
        f"a model; {aside}{way_out}"
    )


def largest_trainable(model: Any) -> float | None:
    """The largest |value| of the trainable weights this process holds whole (None under sharding, where it holds
    pieces)."""
    import torch

    values = [p for p in model.parameters() if p.requires_grad]
    if not values or any(p.numel() == 0 or type(p.data) is not torch.Tensor for p in values):
        return None
    with torch.no_grad():
        return max(float(p.detach().abs().max()) for p in values)
