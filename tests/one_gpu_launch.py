"""``launch/train.py`` as if this machine had exactly one GPU, for tests/test_fallback.py (run by accelerate launch
on CPU): only the single-device fallback's device count is faked; everything else is the real entry point."""

import dataclasses
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dpo_dist import launch_policy as fallback  # noqa: E402

real_read_launch = fallback.read_launch
fallback.read_launch = lambda: dataclasses.replace(real_read_launch(), devices=1)
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
sys.path.insert(0, os.path.join(ROOT, "launch"))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(sys.argv[0], run_name="__main__")
