"""``launch/train.py`` whose second checkpoint write stops halfway, for tests/test_slurm.py to SIGKILL it there.

    python tests/slow_checkpoint_launch.py MARKER_FILE section.key=value ...

Accelerate's ``save_state`` writes the model, optimizer, scheduler and RNG files of the second checkpoint, then this
creates MARKER_FILE and sleeps before ``trainer_state.json`` and the rename: a process killed now was killed in the
middle of writing a checkpoint. Everything else is the real entry point.
"""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from accelerate import Accelerator  # noqa: E402

marker = sys.argv.pop(1)
real_save_state = Accelerator.save_state
calls = []


def save_state_then_stall(self, *args, **kwargs):
    result = real_save_state(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        open(marker, "w").close()
        time.sleep(600)
    return result


Accelerator.save_state = save_state_then_stall
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
sys.path.insert(0, os.path.join(ROOT, "launch"))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(sys.argv[0], run_name="__main__")
