"""Stop cleanly on a preemption signal: checkpoint at the next optimizer step and exit, so a requeued job resumes.

SLURM warns a job before its time limit with ``--signal=B:USR1@SECONDS`` and preempts or requeues it with SIGTERM
(``scontrol requeue``, a higher-priority job). Either way every process of the job gets the signal (through
``srun`` and the ``torchrun`` agent of ``accelerate launch``, which ``slurm/dpo.sbatch`` tells to pass SIGUSR1 on),
though not necessarily during the same step. The handler only records it; once per optimizer step the processes
agree (a max over processes) so that all of them write the same checkpoint and stop at the same step.
"""

from __future__ import annotations

import ctypes
import os
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

    def by(self) -> str:
        return self.received.name if self.received else "a signal to another process"

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process got a stop signal. A collective: every process calls it at the same step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    def stop_if_asked(self, accelerator: Any, where: str) -> None:
        """Before the first training step: stop cleanly (raise :class:`Preempted`) if any process was signalled.
        A collective, like :meth:`agreed`."""
        if self.agreed(accelerator):
            raise Preempted(f"stopped by {self.by()} {where}, before a training step: no checkpoint was needed (the "
                            "last one, if any, is as it was); run the same command again to continue")

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# Processes that launch the trainer and wait for it: accelerate's one-process launcher, and torchrun's agent (inside
# ``accelerate launch --multi_gpu`` and DeepSpeed launches), which sets TORCHELASTIC_RUN_ID in its workers' environment.
LAUNCHER_MARKERS = ("accelerate", "torch.distributed.run", "torchrun")
PR_SET_PDEATHSIG = 1


def launcher_pid() -> int | None:
    """The parent process when it is a launcher (accelerate launch, torchrun), else None."""
    parent = os.getppid()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return parent
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return parent if any(marker in cmdline for marker in LAUNCHER_MARKERS) else None


def stop_with_launcher() -> bool:
    """Get SIGTERM when the launcher dies, so that a signal sent to the launcher alone checkpoints and stops the
    trainer instead of orphaning it (which then trained on to the end, unseen).

    ``accelerate launch`` (one process) dies of SIGTERM or SIGUSR1 without passing it on; torchrun's agent dies of
    SIGUSR1 unless ``PET_SIGNALS_TO_HANDLE`` names it. Linux's ``PR_SET_PDEATHSIG`` makes the kernel send this process
    SIGTERM when its parent exits, which :class:`StopSignals` records like any preemption signal. Returns whether it
    was set (Linux, under a launcher)."""
    parent = launcher_pid()
    if parent is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the launcher died before the request was made: act as if told
        os.kill(os.getpid(), signal.SIGTERM)
    return True

