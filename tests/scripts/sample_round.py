"""Run by test_round_sampling.py under ``accelerate launch`` (DDP, ZeRO-3 or FSDP2 on 2 CPU processes): a round's
completions of the test's prompts, from the policy as ``accelerator.prepare`` holds it, with each rank's generate
calls counted."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dpo_dist.distributed import build_accelerator, configure_deepspeed, fsdp_version, zero_stage  # noqa: E402
from dpo_dist.rounds.sampling import sample_round  # noqa: E402
from test_round_sampling import BATCH_SIZE, N, SAMPLING, prompts  # noqa: E402

model_dir, cache_dir, out = sys.argv[1:4]
accelerator = build_accelerator()
configure_deepspeed(accelerator, per_device_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=None,
                    dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
model, optimizer = accelerator.prepare(model, optimizer)
policy = accelerator.unwrap_model(model)
calls = [0]
generate = policy.generate


def counted(*args, **kwargs):
    calls[0] += 1
    return generate(*args, **kwargs)


policy.generate = counted
result = sample_round(model, tokenizer, prompts(len(tokenizer)), n=N, sampling=SAMPLING, batch_size=BATCH_SIZE,
                      accelerator=accelerator, cache_dir=cache_dir, show_progress=False)
from accelerate.utils import gather_object  # noqa: E402

calls = gather_object(calls)
if accelerator.is_main_process:
    with open(out, "w") as handle:
        json.dump({"completions": result.completions, "processes": accelerator.num_processes, "calls": calls,
                   "sampled": result.sampled, "zero_stage": zero_stage(accelerator),
                   "fsdp_version": fsdp_version(accelerator)}, handle)
accelerator.wait_for_everyone()
# Ended as launch/train.py ends a distributed process (exit_now): the interpreter's teardown of gloo's native objects
# can abort a process whose work is done ("terminate called without an active exception", SIGABRT).
sys.stdout.flush()
os._exit(0)
