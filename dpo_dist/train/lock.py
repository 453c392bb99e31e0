"""One run per output folder: ``<output_dir>/run.lock``, held by the run's main process from before anything is
written there until the run ends (returns or raises; a killed run leaves it).

The lock names its holder: host, PID, start time, the SLURM job id where there is one, and (Linux) the machine's boot
id and the process's start time, which tell a live holder from a PID reused since. It is written whole to a file of
its own and linked into place (``os.link`` fails if the name exists: atomic on local and network file systems).

A second run into a locked folder is refused in one line naming the holder. A lock whose holder is known to be gone
is taken over, with a line saying whose it was and why it is stale:

- on the same host: its process is not running (or another process holds its PID, or the machine has restarted);
- from the same SLURM job (``SLURM_JOB_ID``), on any host: the job was requeued (``sbatch --requeue``, or preempted
  and requeued), and SLURM starts a job again only after the earlier run of it has ended, on whichever node.

A lock held on another host, outside this job, cannot be checked from here: it is refused, and the message says to
delete the file if that run is known to be gone. Only the main process of a launch takes the lock; the others wait
for its answer, so every process of a refused launch stops alike.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from dpo_dist.config import ConfigError

LOCK_FILE = "run.lock"


class OutputLock:
    """The lock of ``output_dir``: :meth:`acquire` after the folder exists (every process calls it), :meth:`release`
    when the run ends (a no-op where it was not taken)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.mine: dict[str, Any] | None = None

    def acquire(self, accelerator: Any) -> str | None:
        """Take the lock on the main process; a :class:`ConfigError` on every process if another run holds it.
        Returns the line saying a stale lock was taken over (main process), or None."""
        said = problem = None
        if accelerator.is_main_process:
            try:
                said = self.take()
            except ConfigError as error:
                problem = str(error)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise ConfigError(problem)
        return said

    def take(self) -> str | None:
        me = this_process()
        tmp = f"{self.path}.{me['host']}.{me['pid']}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
            handle.flush()
            os.fsync(handle.fileno())
        said = None
        try:
            for _ in range(3):  # a holder that ends while we look: try again
                try:
                    os.link(tmp, self.path)
                    self.mine = me
                    return said
                except FileExistsError:
                    pass
                holder = read_holder(self.path)
                if holder is None:
                    if not os.path.exists(self.path):
                        continue  # its run ended while we looked
                    raise ConfigError(f"{self.path} does not name the run that holds train.output_dir (not written by "
                                      "dpo-dist?): if no run uses the folder, delete it")
                why = stale(holder, me)
                if why is None:
                    raise ConfigError(
                        f"train.output_dir {os.path.dirname(self.path)} is in use by another run ({describe(holder)}; "
                        f"{self.path}): wait for it to end or use another train.output_dir; if that run is gone "
                        f"(ended on another machine), delete {self.path}")
                if read_holder(self.path) == holder:  # still the stale one: no other run has taken it meanwhile
                    os.remove(self.path)
                    said = f"took over {self.path} from a run that is gone ({describe(holder)}: {why})"
            raise ConfigError(f"{self.path} keeps changing: another run is starting in train.output_dir; start one")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        """Remove the lock if this run holds it (and it is still its own)."""
        if self.mine is not None and read_holder(self.path) == self.mine:
            os.remove(self.path)
        self.mine = None


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "boot_id": _boot_id(), "process_start": _process_start(pid)}


def read_holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}{job}"


def stale(holder: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why the run that wrote ``holder`` is known to be gone, seen from the process ``me``; None if it may run."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id"):
        return f"SLURM job {me['slurm_job_id']} has started again (requeued), so its earlier run has ended"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    if holder.get("boot_id") and me.get("boot_id") and holder["boot_id"] != me["boot_id"]:
        return "the machine has restarted since"
    if pid == me["pid"]:
        return "it was this process's, from a run in it that did not end normally"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is not running"
    except PermissionError:
        pass  # another user's live process
    started = _process_start(pid)
    if holder.get("process_start") is not None and started is not None and started != holder["process_start"]:
        return f"PID {pid} is another process now"
    return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux: field 22 of /proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
