"""launch/train.py with its checkpoint functions timed, for benchmarks/checkpoints.py (run under accelerate launch).

    CHECKPOINT_TIMES=times.jsonl python benchmarks/checkpoint_worker.py section.key=value ...

The main process appends one JSON line per call to ``CHECKPOINT_TIMES``: ``{"what", "seconds"}`` for the whole save
(``save``), the manifest inside it (``manifest``: every file's SHA-256), the whole load (``load``), the check against
the manifest before it (``verify``) and DeepSpeed's universal checkpoint conversion inside a load on another process
count (``universal``). Wall-clock seconds in the main process; the others do the same work alongside it.
"""

import functools
import json
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dpo_dist.train import checkpoint, final, trainer  # noqa: E402

RECORD = os.environ["CHECKPOINT_TIMES"]


def timed(what, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if int(os.environ.get("RANK", "0")) == 0:
                with open(RECORD, "a") as handle:
                    handle.write(json.dumps({"what": what, "seconds": time.perf_counter() - start}) + "\n")

    return wrapper


for name, what in (("save_checkpoint", "save"), ("load_checkpoint", "load"), ("write_manifest", "manifest"),
                   ("verify_checkpoint", "verify"), ("_to_universal", "universal")):
    setattr(checkpoint, name, timed(what, getattr(checkpoint, name)))
    for module in (trainer, final):  # each calls the name it imported
        if hasattr(module, name):
            setattr(module, name, getattr(checkpoint, name))

script = os.path.join(ROOT, "launch", "train.py")
sys.argv = [script, *sys.argv[1:]]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
