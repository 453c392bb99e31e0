"""Build the Accelerator the way this machine needs it, and shard work over its processes.

Everything distributed goes through the ``Accelerator``: the math modules never call ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any

import torch


def build_accelerator(*, timeout_s: int | None = None, **kwargs: Any):
    """An ``accelerate.Accelerator`` that sees every process, GPUs or not.

    ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs leaves each process alone unless
    Accelerate's state is created with ``cpu=True`` first; then the processes form one MULTI_CPU group over gloo.
    ``timeout_s`` bounds how long a collective may wait for a missing rank.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    state_kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        state_kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(timeout=state_kwargs["timeout"]))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(cpu=True, **state_kwargs)
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def shard_indices(n: int, accelerator: Any) -> list[int]:
    """This process's contiguous share of ``range(n)``, padded to ``ceil(n / processes)`` by repeating the last
    index, so every process runs the same number of batches (ZeRO-3 needs every rank in every forward)."""
    per_rank = math.ceil(n / accelerator.num_processes)
    start = accelerator.process_index * per_rank
    return [min(i, n - 1) for i in range(start, start + per_rank)]


def gather_in_order(local: torch.Tensor, n: int, accelerator: Any) -> torch.Tensor:
    """The rows every process computed for its ``shard_indices``, in dataset order, padding dropped."""
    return accelerator.gather(local.contiguous())[:n]


def set_cpu_threads(requested: int | None, accelerator: Any) -> int | None:
    """Threads per process for CPU runs: ``requested``, or the CPUs this process may use divided by the processes on
    this machine. ``accelerate launch`` without a config sets ``OMP_NUM_THREADS=1`` on machines without GPUs, which
    halves a 2-core machine's speed; this undoes that. Returns the count, or None on GPU runs."""
    if accelerator.device.type != "cpu":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, available // max(1, local))
    torch.set_num_threads(threads)
    return threads
