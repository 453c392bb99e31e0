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
import stat
import sys
import threading
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command again to continue
STUCK_EXIT_CODE = 124  # as timeout(1): a stop signal found no step boundary within its grace period


class Preempted(Exception):
    """Raised after the checkpoint is written; the message says what happened and how to continue."""


class StopSignals:
    """Records SIGUSR1 / SIGTERM instead of dying; restores the previous handlers on ``close``.

    With ``grace_s``, a stop signal also starts a clock: a process that has not finished (checkpointed and closed
    this) ``grace_s`` seconds later exits with status 124 and a message. That bounds a rank stuck in a collective,
    whose main thread never returns to Python to run the handler: the signal is seen by a watcher thread through
    ``signal.set_wakeup_fd``, which the C-level handler writes to whatever the main thread is doing.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *, grace_s: float | None = None):
        self.received: signal.Signals | None = None
        self._previous = {}
        self._closed = threading.Event()
        self._wakeup: tuple[int, int, int] | None = None  # (read end, write end, the previous wakeup fd)
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (an in-process test runner, say): signals stay as they were
                pass
        if grace_s is not None and self._previous:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
            numbers = {int(sig) for sig in self._previous}
            threading.Thread(target=self._watch, args=(read, numbers, grace_s), daemon=True,
                             name="stop-signal-watchdog").start()

    def _watch(self, read: int, numbers: set[int], grace_s: float) -> None:
        """Runs in its own thread: at the first stop signal, wait ``grace_s`` for :meth:`close`, else exit."""
        try:
            self._wait_for_a_stop(read, numbers, grace_s)
        finally:
            os.close(read)

    def _wait_for_a_stop(self, read: int, numbers: set[int], grace_s: float) -> None:
        while not self._closed.is_set():
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            stop = next((n for n in data if n in numbers), None)
            if stop is None:
                continue  # another signal with a Python handler (SIGINT, SIGCHLD) also wakes the pipe
            if not self._closed.wait(grace_s):
                print(f"{signal.Signals(stop).name} was received {grace_s:g} s ago and this process has not reached "
                      "a step boundary since (stuck in a collective, waiting for a rank that is gone?): exiting with "
                      f"status {STUCK_EXIT_CODE}, no checkpoint written by this stop (the last one stands; "
                      "train.stop_grace_s sets the wait)", file=sys.stderr, flush=True)
                os._exit(STUCK_EXIT_CODE)
            return

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        write_where_the_launcher_wrote()  # the signal may be the launcher's death: what follows must still arrive

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

    def raise_if_received(self, where: str) -> None:
        """Raise :class:`Preempted` if this process got a stop signal: for work one process does alone (sampling the
        built-in data set), where the others wait and there is no step to agree on. Not a collective."""
        if self.received is not None:
            raise Preempted(f"stopped by {self.by()} {where}, before a training step: nothing was written (the "
                            "set is built again from the start); run the same command again to continue")

    def close(self) -> None:
        self._closed.set()
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)  # the watcher's read returns empty and it ends
            self._wakeup = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# Processes that launch the trainer and wait for it: accelerate's one-process launcher, and torchrun's agent (inside
# ``accelerate launch --multi_gpu`` and DeepSpeed launches), which sets TORCHELASTIC_RUN_ID in its workers' environment.
# slurm/accelerate_launch.py (``accelerate launch`` without the traceback of a stop) matches "accelerate".
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
    """Outlive the launcher: get SIGTERM when it dies, so that a signal sent to the launcher alone checkpoints and stops
    the trainer instead of orphaning it (which then trained on to the end, unseen), and keep a way to where the
    launcher writes (:func:`keep_launcher_output`), so that what the trainer says after that still reaches the user.

    ``accelerate launch`` (one process) dies of SIGUSR1 without passing it on, and of SIGTERM before 1.16 (from 1.16
    it passes SIGTERM on and kills the trainer 5 s later); torchrun's agent dies of SIGUSR1 unless
    ``PET_SIGNALS_TO_HANDLE`` names it. Linux's ``PR_SET_PDEATHSIG`` makes the kernel send this process SIGTERM when
    its parent exits, which :class:`StopSignals` records like any preemption signal. Returns whether it was set
    (Linux, under a launcher)."""
    parent = launcher_pid()
    if parent is None:
        return False
    keep_launcher_output(parent)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the launcher died before the request was made: act as if told
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# Where the launcher writes what it reads from this process through a pipe: (launcher pid, [(fd, open descriptor)]).
_launcher_output: tuple[int, list[tuple[int, int]]] | None = None


def keep_launcher_output(parent: int) -> list[int]:
    """Open now, while the launcher lives, where it writes each of this process's stdout and stderr that it reads
    through a pipe (its own stdout and stderr: a terminal, a log file, SLURM's output), for
    :func:`write_where_the_launcher_wrote` to switch to once it is gone. Returns the descriptors kept.

    From 1.16 the one-process ``accelerate launch`` reads the trainer's stderr through a pipe and copies it to its
    own. A stop signal kills that launcher at once (SIGUSR1), and the trainer, still finishing its step and
    checkpoint, would then write into a pipe nobody reads: its "preempted" line lost, and the write failing with
    EPIPE. While the launcher lives, the trainer keeps writing through it (the launcher may write to the same file,
    from its own offset, so writing beside it would overwrite lines); a file is opened for appending, after whatever
    the launcher wrote last. A target that cannot be opened (a socket, a pipe nobody reads) is left out."""
    global _launcher_output
    kept = []
    for fd in (1, 2):
        try:
            ours = os.fstat(fd)
            theirs = os.stat(f"/proc/{parent}/fd/{fd}")
        except OSError:
            continue
        if not stat.S_ISFIFO(ours.st_mode) or (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            continue  # not a pipe, or the launcher's own: this process already writes where the launcher does
        append = os.O_APPEND if stat.S_ISREG(theirs.st_mode) else 0
        try:  # non-blocking: opening a pipe for writing waits for a reader
            target = os.open(f"/proc/{parent}/fd/{fd}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | append)
        except OSError:
            continue
        os.set_blocking(target, True)
        kept.append((fd, target))
    _launcher_output = (parent, kept) if kept else None
    return [fd for fd, _ in kept]


def write_where_the_launcher_wrote() -> list[int]:
    """Once the launcher is gone, point the descriptors :func:`keep_launcher_output` kept at where it wrote them.
    :class:`StopSignals` calls this at every stop signal (the launcher's death arrives as one); while the launcher
    lives it does nothing. Returns the descriptors switched."""
    global _launcher_output
    if _launcher_output is None or os.getppid() == _launcher_output[0]:
        return []
    _, kept = _launcher_output
    _launcher_output = None
    for fd, target in kept:
        os.dup2(target, fd)
        os.close(target)
    return [fd for fd, _ in kept]
