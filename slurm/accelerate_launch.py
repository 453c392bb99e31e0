"""``accelerate launch`` for one node of slurm/dpo.sbatch (the same arguments), without the traceback of a stop.

The ``torchrun`` agent inside ``accelerate launch`` answers a stop signal (SIGUSR1 before the time limit, SIGTERM
from ``scontrol requeue`` or a preemption) by passing it to the trainers, waiting for them to checkpoint and exit,
then raising ``SignalException``, which ``accelerate launch`` lets out as a 20-line traceback on every node at every
preemption, each one a success (from 1.16 it exits with 128 + the signal's number instead, without a word). Here
either ends in one line and the status of a death by that signal (128 + its number), as the launcher's death would
have been; any other error keeps its traceback. The agent's own warnings
(the signal it got, each process it passed it to) are left out for that line; its errors stay.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main() -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    import torch.distributed.run  # noqa: F401  (creates the agent's loggers, each with its own level)

    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)
    args = launch_command_parser().parse_args()
    try:
        launch_command(args)
        return 0
    except SignalException as stop:  # accelerate before 1.16 lets the agent's exception out
        sig = stop.sigval
    except SystemExit as stop:  # from 1.16 it ends in sys.exit(128 + the signal's number)
        sig = stopped_by(stop.code)
        if sig is None:
            raise
    node = os.environ.get("SLURMD_NODENAME", "this node")
    print(f"accelerate_launch: {node}: {sig.name}: the trainers were passed it and have stopped (their own lines say "
          "whether they checkpointed)", file=sys.stderr, flush=True)
    return 128 + int(sig)


def stopped_by(code: object) -> signal.Signals | None:
    """The stop signal an exit status 128 + N reports, or None for any other status."""
    if isinstance(code, int) and code - 128 in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        return signal.Signals(code - 128)
    return None


if __name__ == "__main__":
    sys.exit(main())
