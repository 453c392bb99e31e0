"""Stop cleanly on a preemption signal: checkpoint at the next optimizer step and exit, so a requeued job resumes.

SLURM warns a job before its time limit with ``--signal=B:USR1@SECONDS`` and preempts or requeues it with SIGTERM
(``scontrol requeue``, a higher-priority job). Either way every process of the job gets the signal (through
``srun`` and the ``torchrun`` agent of ``accelerate launch``, which ``slurm/dpo.sbatch`` tells to pass SIGUSR1 on),
though not necessarily during the same step. The handler only records it; once per optimizer step the processes
agree (a max over processes) so that all of them write the same checkpoint and stop at the same step.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command again to continue


class Preempted(Exception):
    """Raised after the checkpoint is written; the message says what happened and how to continue."""


class StopSignals:
    """Records SIGUSR1 / SIGTERM instead of dying; restores the previous handlers on ``close``."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (an in-process test runner, say): signals stay as they were
                pass

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process got a stop signal. A collective: every process calls it at the same step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
