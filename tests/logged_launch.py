"""Run a launch script as a user would, its output going wherever the test sent it (a log file), with one change:
progress lines every 0 s instead of every 10 s (a line at each step of each stage: what a long stage gives every 10 s).

    python tests/logged_launch.py launch/train.py section.key=value ...
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dpo_dist import progress  # noqa: E402  (light: no torch)

progress.INTERVAL_S = 0.0

script = os.path.join(ROOT, sys.argv[1])
sys.argv = [script, *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(script))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(script, run_name="__main__")
