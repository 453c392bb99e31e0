"""Run a launch script as a user would, its output going wherever the test sent it (a log file), with two changes:
progress lines every 0 s instead of every 10 s (a line at each step of each stage: what a long stage gives every 10 s),
and a last line naming which of bitsandbytes and DeepSpeed the process imported.

    python tests/logged_launch.py launch/train.py section.key=value ...
"""

import atexit
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dpo_dist import progress  # noqa: E402  (light: no torch)

progress.INTERVAL_S = 0.0


@atexit.register
def imported():
    print("imported:", sorted(name for name in ("bitsandbytes", "deepspeed") if sys.modules.get(name) is not None),
          flush=True)


script = os.path.join(ROOT, sys.argv[1])
sys.argv = [script, *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(script))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(script, run_name="__main__")
