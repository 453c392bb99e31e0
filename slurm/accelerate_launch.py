"""``accelerate launch`` for one node of slurm/dpo.sbatch (the same arguments), without the traceback of a stop.

The ``torchrun`` agent inside ``accelerate launch`` answers a stop signal (SIGUSR1 before the time limit, SIGTERM
from ``scontrol requeue`` or a preemption) by passing it to the trainers, waiting for them to checkpoint and exit,
then raising ``SignalException``, which ``accelerate launch`` lets out as a 20-line traceback on every node at every
preemption, each one a success (from 1.16 it exits with 128 + the signal's number instead, without a word). Here
either ends in one line and the status of a death by that signal (128 + its number), as the launcher's death would
have been; any other error keeps its traceback. The agent's own warnings
(the signal it got, each process it passed it to) are left out for that line; its errors stay, but one.

That one is a success reported as a failure. Once the trainers of every node have exited, the nodes' agents meet in
an exit barrier on the first node's store; when the first node's agent is through first, it closes the store under
the others, and each of them logs a C++ warning with a stack and "Error waiting on exit barrier" with a traceback
(seen on a loaded machine). Both are left out: the barrier's error by its message, C++ warnings of this process by
TORCH_CPP_LOG_LEVEL=ERROR unless the user set it (the trainers do not inherit it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys


EXIT_BARRIER_ERROR = "Error waiting on exit barrier"


def main() -> int:
    quiet_cpp = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet_cpp:  # read once, when torch loads
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    import torch.distributed.run  # noqa: F401  (creates the agent's loggers, each with its own level)

    if quiet_cpp:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)
            logger.addFilter(lambda record: not record.getMessage().startswith(EXIT_BARRIER_ERROR))
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
