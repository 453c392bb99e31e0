"""``launch/train.py`` that sends itself SIGTERM as a stage of an iterative-DPO round begins, for tests/test_rounds.py.

    python tests/round_stop_launch.py ROUND:STAGE section.key=value ...

STAGE is one of ``sampling`` (the round's training completions: the signal comes with its first batch, so the stop
leaves some batches cached and others not), ``judging``, ``reference`` (at its first batch), ``training`` (before
its first step) or ``eval``. The signal is recorded as a real preemption's would be (the run's own handler), and
the run stops at that stage's next safe point with status 75. Everything else is the real entry point.
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

when = sys.argv.pop(1)
stop_round, stage = when.split(":")
stop_round = int(stop_round)

from dpo_dist.rounds import loop  # noqa: E402

STAGES = {"sampling": "sample", "judging": "judge_and_rank", "reference": "reference", "training": "train",
          "eval": "evaluate"}
real = getattr(loop.Rounds, STAGES[stage])


def reached(self, args) -> bool:
    if stage == "sampling":  # sample(model, ids, n, sampling, folder, key_parts, r): the training prompts' only
        return args[-1] == stop_round and args[1] is self.train_ids
    return args[0] == stop_round  # the others take the round first


def signalled(self, *args, **kwargs):
    if reached(self, args):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *args, **kwargs)


setattr(loop.Rounds, STAGES[stage], signalled)
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
sys.path.insert(0, os.path.join(ROOT, "launch"))  # as Python puts a script's folder first (runpy does not)
runpy.run_path(sys.argv[0], run_name="__main__")
