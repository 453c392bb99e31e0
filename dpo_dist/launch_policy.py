"""Launch policy: the single-device fallback, by which a launch that asks for sharding on a machine with one device
trains QLoRA there.

A recipe written for a cluster (``accelerate launch --config_file accelerate_configs/zero3.yaml ...``) taken to a
workstation with one GPU, or to a laptop, would otherwise crash (two processes on one GPU), or shard nothing and run
out of memory (ZeRO with one process). Instead ``launch/train.py`` falls back to the QLoRA single-device setup and
says so in one line:

- the base in 4-bit NF4 with LoRA adapters (a recipe that already quantizes keeps its setting) and gradient
  checkpointing;
- one process: the launcher's other processes on this machine exit at once, with status 0;
- the same global batch: gradient accumulation is multiplied by the processes that were asked for.

``train.single_device_fallback=false`` runs the launch as given instead.

It rewrites this process's environment (the survivor becomes a plain single process) and sends the launcher's other
processes away, before any stage runs: launch policy, so it sits at the top beside ``distributed``, not in a stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

from dpo_dist.config import Config, ConfigError
from dpo_dist.distributed import uses_deepspeed

# What torchrun / accelerate launch set for a distributed worker; removed to make the survivor a plain process.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


@dataclass(frozen=True)
class Launch:
    """What this process was launched as, and what the machine has."""

    world_size: int  # processes in the job, all machines
    local_world_size: int  # processes on this machine
    local_rank: int
    deepspeed: bool  # accelerate launch was given a DeepSpeed config
    devices: int  # GPUs on this machine; 0 on a CPU-only machine

    @property
    def capacity(self) -> int:
        """Processes this machine can give a device each: its GPUs, or any number of CPU processes (gloo)."""
        return self.devices if self.devices else max(1, self.local_world_size)


def read_launch() -> Launch:
    import torch

    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return Launch(
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_world_size=local_world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        deepspeed=uses_deepspeed(),
        devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
    )


def needs_fallback(launch: Launch) -> str | None:
    """Why this launch cannot use what it asked for, or None when it can.

    Only single-machine launches fall back (on several machines the other nodes' devices are there).
    """
    if launch.world_size != launch.local_world_size or launch.capacity != 1:
        return None
    if launch.local_world_size > 1:
        return f"{launch.local_world_size} processes were launched but this machine has one GPU"
    if launch.deepspeed:
        where = "one GPU" if launch.devices else "no GPU"
        return f"a DeepSpeed ZeRO config was given, but ZeRO shards nothing in one process ({where} here)"
    return None


def qlora_config(cfg: Config, processes_asked: int) -> Config:
    """The QLoRA single-device setup of ``cfg``, with the same global batch."""
    model = dataclasses.replace(
        cfg.model, quantization=cfg.model.quantization if cfg.model.quantization != "none" else "4bit",
        gradient_checkpointing=True,
    )
    lora = dataclasses.replace(cfg.lora, enabled=True)
    train = dataclasses.replace(
        cfg.train, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps * processes_asked
    )
    return dataclasses.replace(cfg, model=model, lora=lora, train=train).validate()


def apply_fallback(cfg: Config, launch: Launch | None = None) -> tuple[Config | None, str | None]:
    """``(config to train, message)``. The config is None for a process that should exit (not local rank 0); the
    message is the one line to log, or None when nothing changed. Rank 0 is turned into a plain single process."""
    launch = launch or read_launch()
    reason = needs_fallback(launch) if cfg.train.single_device_fallback else None
    if reason is None:
        return cfg, None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{reason}, and the single-device fallback (QLoRA) needs bitsandbytes: python3 -m pip install -e "
            "'.[qlora]', or set train.single_device_fallback=false to run the launch as given"
        )
    if launch.local_rank != 0:
        return None, None
    fallen = qlora_config(cfg, launch.local_world_size)
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    device = "cuda:0" if launch.devices else "cpu"
    lora = fallen.lora.target_modules if isinstance(fallen.lora.target_modules, str) else ",".join(fallen.lora.target_modules)
    message = (
        f"single-device fallback: {reason}; training QLoRA on {device} instead ({fallen.model.quantization} base, "
        f"LoRA r={fallen.lora.r} on {lora}, gradient checkpointing, 1 process, gradient accumulation "
        f"{cfg.train.gradient_accumulation_steps} -> {fallen.train.gradient_accumulation_steps} for the same global "
        "batch); train.single_device_fallback=false runs the launch as given"
    )
    return fallen, message
