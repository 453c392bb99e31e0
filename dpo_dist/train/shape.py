"""The shape of a run (processes x accumulation x pairs per device = the global batch) and what a resume on another
shape does.

A checkpoint records the shape it was written with and the pairs seen (``trainer_state.json``). The position in the
data is the pairs seen, which is the optimizer step times the global batch; the data order
(:class:`~dpo_dist.data.order.DataOrder`) gives step ``g`` the same ``g``-th block of pairs whatever the split of
that block over processes and micro-batches, so a resume that keeps the global batch continues the same trajectory:

- same engine family, any split of the same global batch: resumed; where this launch's processes and per-device batch
  do not give the checkpoint's global batch but another accumulation does, the accumulation is recomputed and said;
- one process and DDP write the same files (the adapter or the weights, one optimizer state): any process count;
  a one-process full fine-tune also under FSDP2, each rank taking its shard of the weights and optimizer state;
- DeepSpeed and FSDP2 checkpoints hold each rank's shards: resumed under the same engine on any process count
  (DeepSpeed's through its universal checkpoint, made from the shards on first need; FSDP2's by
  ``torch.distributed.checkpoint``, which records which slice of each tensor every rank holds, resharded on load),
  full fine-tuning or LoRA, optimizer state included; an FSDP2 checkpoint also on one process, read whole;
- anything else (another global batch, another engine) is refused in one line before any work, naming what would work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from dpo_dist.config import STATE_FILE, Config
from dpo_dist.train.checkpoint import CheckpointError, written_by


@dataclass(frozen=True)
class Shape:
    """How a run splits its global batch. ``engine``: ``one process``, ``DDP``, ``ZeRO-<stage>`` or ``FSDP2``."""

    processes: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    engine: str

    @property
    def global_batch(self) -> int:
        """Pairs per optimizer step: the one place it is computed."""
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.processes

    def said(self) -> str:
        return (f"{self.global_batch} pairs = {self.per_device_batch_size} per device x "
                f"{self.gradient_accumulation_steps} accumulation x {self.processes} processes")


def engine_name(processes: int, stage: int, fsdp: int) -> str:
    if stage:
        return f"ZeRO-{stage}"
    if fsdp:
        return f"FSDP{fsdp}"
    return "DDP" if processes > 1 else "one process"


def family(engine: str) -> str:
    """Engines whose checkpoints hold the same files: one process and DDP; each ZeRO stage; FSDP2."""
    return "plain" if engine in ("DDP", "one process") else engine


def run_shape(cfg: Config, processes: int, engine: str) -> Shape:
    t = cfg.train
    return Shape(processes, t.per_device_batch_size, t.gradient_accumulation_steps, engine)


def saved_shape(path: str) -> Shape | None:
    """The shape a checkpoint was written with (``trainer_state.json``'s ``shape``); for one written before
    checkpoints recorded it, None."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        recorded = json.load(handle).get("shape")
    return Shape(**recorded) if recorded else None


def resume_shape(cfg: Config, now: Shape, path: str, *, accumulation_given: bool = False) -> tuple[Config, str | None]:
    """The config to resume the checkpoint ``path`` with on this launch (``now``), and the line that says what changed
    (None when nothing did); a :class:`CheckpointError` where it cannot continue on this shape. ``accumulation_given``:
    this resume changed train.gradient_accumulation_steps against the run's config.yaml, so it is the user's and is not
    recomputed (config.yaml keeps the accumulation as given, so a run resumed on fewer processes, whose accumulation was
    recomputed, resumes again with the same config)."""
    name = os.path.basename(os.path.normpath(path))
    saved = saved_shape(path)
    if saved is None:  # written before checkpoints recorded their shape: only the process count is known
        processes = written_by(path)
        if processes and processes != now.processes:
            raise CheckpointError(f"{name} was written by {processes} processes before checkpoints recorded their batch "
                             f"split: resume it on {processes} processes, or start over with train.resume=never")
        return cfg, None
    gathered = saved.engine == "FSDP2" and now.engine == "one process"
    gathered |= saved.engine == "one process" and now.engine == "FSDP2" and not cfg.lora.enabled  # sharded on load
    if family(saved.engine) != family(now.engine) and not gathered:
        raise CheckpointError(f"{name} was written under {saved.engine} ({saved.processes} processes), this launch runs "
                         f"{now.engine}: resume it {resumes_under(saved, cfg)}, or start over with train.resume=never")
    if now.global_batch == saved.global_batch:
        changed = (now.processes, now.per_device_batch_size) != (saved.processes, saved.per_device_batch_size)
        return cfg, (f"resumed {name} with its global batch of {now.said()} (it was written with "
                     f"{saved.said()})" if changed else None)
    per_step = now.per_device_batch_size * now.processes
    if not accumulation_given and saved.global_batch % per_step == 0:
        accumulation = saved.global_batch // per_step
        kept = dataclasses.replace(now, gradient_accumulation_steps=accumulation)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_accumulation_steps=accumulation))
        return cfg, (f"train.gradient_accumulation_steps {now.gradient_accumulation_steps} -> {accumulation}, to keep "
                     f"{name}'s global batch: {kept.said()} (it was written with {saved.said()})")
    raise CheckpointError(f"{name} was trained with a global batch of {saved.said()}; {now.said()} is another, and "
                     f"continuing would change the run's batch mid-way: {options(saved.global_batch, now)}, or start "
                     "over with train.resume=never")


def resumes_under(saved: Shape, cfg: Config) -> str:
    """Where a checkpoint resumes, in words: under its own engine on any process count (DeepSpeed's shards through its
    universal checkpoint, FSDP2's resharded by ``torch.distributed.checkpoint``: :mod:`dpo_dist.train.checkpoint`);
    one process and DDP either way, and a one-process full fine-tune's also under FSDP2 (sharded on load); an FSDP2
    one also on one process (its shards read whole)."""
    if family(saved.engine) == "plain":
        fsdp = saved.engine == "one process" and not cfg.lora.enabled
        return "on one process or DDP, any process count" + (", or under FSDP2" if fsdp else "")
    if saved.engine != "FSDP2":
        return f"under {saved.engine}, any process count"
    return "under FSDP2 on any process count, or on one process (launched without FSDP)"


def options(global_batch: int, now: Shape) -> str:
    """What keeps ``global_batch`` from this launch: another accumulation, per-device batch or process count."""
    said = []
    if global_batch % (now.per_device_batch_size * now.processes) == 0:
        said.append(f"train.gradient_accumulation_steps="
                    f"{global_batch // (now.per_device_batch_size * now.processes)}")
    if global_batch % now.processes == 0:
        sizes = [b for b in range(1, global_batch // now.processes + 1) if global_batch // now.processes % b == 0]
        said.append(f"train.per_device_batch_size in {sizes} with the matching accumulation")
    counts = [p for p in range(1, global_batch // now.per_device_batch_size + 1)
              if global_batch % (p * now.per_device_batch_size) == 0] if global_batch % now.per_device_batch_size == 0 else []
    if counts:
        said.append(f"launch on {', '.join(map(str, counts))} process{'es' if counts != [1] else ''} "
                    f"(train.per_device_batch_size={now.per_device_batch_size})")
    return "set " + "; or ".join(said) if said else "launch on a process count that divides it"


def record(shape: Shape) -> dict[str, Any]:
    return dataclasses.asdict(shape)
