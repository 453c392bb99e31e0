"""``accelerate launch`` for one node of slurm/dpo.sbatch (the same arguments), without the traceback of a stop.

The ``torchrun`` agent inside ``accelerate launch`` answers a stop signal (SIGUSR1 before the time limit, SIGTERM
from ``scontrol requeue`` or a preemption) by passing it to the trainers, waiting for them to checkpoint and exit,
then raising ``SignalException`` — which ``accelerate launch`` let out as a 20-line traceback on every node at every
preemption, each one a success. Here that ends in one line and the status of a death by that signal (128 + its
number), as the launcher's death would have been; any other error keeps its traceback. The agent's own warnings
(the signal it got, each process it passed it to) are left out for that line; its errors stay.
"""

from __future__ import annotations

import logging
import os
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
    except SignalException as stop:
        node = os.environ.get("SLURMD_NODENAME", "this node")
        print(f"accelerate_launch: {node}: {stop.sigval.name}: the trainers were passed it and have stopped (their "
              "own lines say whether they checkpointed)", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
