"""``launch/train.py`` on a disk that fills up while a checkpoint is written, for tests/test_disk.py.

    python tests/full_disk_launch.py FOLDER section.key=value ...

The first ``torch.save`` into FOLDER (a ``checkpoint-<step>.tmp``) writes part of its file and raises what torch
raises on a full disk (two C++ stream errors, no errno); from then on ``shutil.disk_usage`` reports no space left
beyond what is deleted afterwards. Everything else is the real entry point.
"""

import collections
import os
import runpy
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

folder = sys.argv.pop(1)
real_save, real_usage, full = torch.save, shutil.disk_usage, []
Usage = collections.namedtuple("Usage", "total used free")


def tree_size(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def save(obj, f, *args, **kwargs):
    if full or not str(f).startswith(folder):
        return real_save(obj, f, *args, **kwargs)
    with open(f, "wb") as handle:
        handle.write(b"\0" * 1000)
    full.append(tree_size(os.path.dirname(folder)))
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 142144 vs 142032") from None


def usage(path):
    if not full:
        return real_usage(path)
    free = max(0, full[0] - tree_size(os.path.dirname(folder)))
    return Usage(full[0], full[0] - free, free)


torch.save, shutil.disk_usage = save, usage
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
sys.path.insert(0, os.path.join(ROOT, "launch"))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(sys.argv[0], run_name="__main__")
