"""``launch/train.py`` that says when it has reached a point, for tests/test_signals.py to signal its launcher there.

    python tests/signal_launch.py RUN_DIR WHEN section.key=value ...

WHEN is ``step:N`` (after optimizer step N), ``reference:N`` (after batch N of the reference precompute),
``sentiment:N`` (at the N-th token sampled while the built-in sentiment set is built) or
``stuck:N`` (after step N rank 1 hangs before its next step, so rank 0 waits in that step's collective). When that
point is reached this creates ``RUN_DIR/reached``; from then on each step (or batch) takes a second longer, so
the signal arrives while the run is still going. Every process writes its pid to ``RUN_DIR/pid-<rank>`` and the status
it exits with to ``RUN_DIR/status-<rank>`` (distributed processes end with ``os._exit``, which skips ``atexit``).
Everything else is the real entry point.
"""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

run_dir, when = sys.argv.pop(1), sys.argv.pop(1)
kind, count = when.split(":")
rank = os.environ.get("RANK", "0")
calls = []
with open(os.path.join(run_dir, f"pid-{rank}"), "w") as handle:
    handle.write(str(os.getpid()))


def reached() -> None:
    calls.append(1)
    if len(calls) == int(count) and rank == "0":
        open(os.path.join(run_dir, "reached"), "w").close()
    if len(calls) >= int(count):
        time.sleep(1.0)


def record_status(code) -> None:
    with open(os.path.join(run_dir, f"status-{rank}"), "w") as handle:
        handle.write(str(code))


if kind in ("step", "stuck"):
    from dpo_dist.train import trainer

    real_step = trainer.train_step

    def train_step(*args, **kwargs):
        if kind == "stuck" and rank == "1" and len(calls) == int(count):
            while True:  # a rank that never comes back (a hung data loader, a deadlock)
                time.sleep(3600)
        record = real_step(*args, **kwargs)
        reached()
        return record

    trainer.train_step = train_step
elif kind == "sentiment":  # at the N-th sampled token of the built-in data set's build
    from dpo_dist.data import sentiment

    real_check = sentiment._EachToken.__call__

    def check(self, *args, **kwargs):
        reached()
        return real_check(self, *args, **kwargs)

    sentiment._EachToken.__call__ = check
else:
    from dpo_dist.train import reference

    real_logps = reference.pair_logps

    def pair_logps(*args, **kwargs):
        out = real_logps(*args, **kwargs)
        reached()
        return out

    reference.pair_logps = pair_logps

real_exit = os._exit


def exit_recorded(code):
    record_status(code)
    real_exit(code)


os._exit = exit_recorded
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
sys.path.insert(0, os.path.join(ROOT, "launch"))  # as Python puts a script's folder first (runpy does not)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    record_status(stop.code if isinstance(stop.code, int) else 1)
    raise
except BaseException:  # a traceback: the interpreter exits with 1
    record_status(1)
    raise
