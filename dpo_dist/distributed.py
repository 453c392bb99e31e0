"""Build the Accelerator the way this machine needs it; everything distributed goes through that object."""

from __future__ import annotations

import os
from typing import Any

import torch


def build_accelerator(**kwargs: Any):
    """An ``accelerate.Accelerator`` that sees every process, GPUs or not.

    ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs leaves each process alone unless
    Accelerate's state is created with ``cpu=True`` first; then the processes form one MULTI_CPU group over gloo.
    """
    from accelerate import Accelerator, PartialState

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(cpu=True)
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)
