"""Run by test_deepspeed.py under ``accelerate launch`` with a ZeRO config: training whose loss turns NaN at step 2.

    accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 2 \
        tests/scripts/nonfinite_deepspeed.py RESULT_DIR section.key=value ...

Each process writes RESULT_DIR/rank<R>.json: the TrainingError message, how many times the DeepSpeed engine stepped,
and how far the failed step moved the weights (every rank holds them whole under ZeRO-2).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.train import objective, trainer  # noqa: E402

result_dir, overrides = sys.argv[1], sys.argv[2:]
engine_steps, losses_computed, weights_after_step = [], [], []

real_engine_step = deepspeed.DeepSpeedEngine.step


def counted_engine_step(self, *args, **kwargs):
    engine_steps.append(1)
    return real_engine_step(self, *args, **kwargs)


real_loss = objective.preference_loss


def nan_at_step_2(*args, **kwargs):
    losses_computed.append(1)
    losses, chosen, rejected = real_loss(*args, **kwargs)
    return (losses * float("nan") if len(losses_computed) == 2 else losses), chosen, rejected


real_train_step = trainer.train_step


def keep_weights(model, *args, **kwargs):
    record = real_train_step(model, *args, **kwargs)
    weights_after_step.append([p.detach().clone() for p in model.parameters()])
    return record


deepspeed.DeepSpeedEngine.step = counted_engine_step
objective.preference_loss = nan_at_step_2
trainer.train_step = keep_weights
try:
    trainer.train(load_config(None, overrides))
    message = None
except trainer.TrainingError as error:
    message = str(error)
before, after = weights_after_step[-2], weights_after_step[-1]
result = {
    "message": message,
    "train_steps": len(weights_after_step),
    "engine_steps": len(engine_steps),
    "moved_by_failed_step": max((a - b).abs().max().item() for a, b in zip(after, before)),
    "finite": all(bool(torch.isfinite(p).all()) for p in after),
}
with open(os.path.join(result_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(result, handle)
sys.stdout.flush()
os._exit(0)  # as launch/train.py ends: gloo's and DeepSpeed's teardown at interpreter exit now and then aborts
