"""Completions of held-out prompts while training (``train.sample_prompts``): what the policy writes, step by step.

At each sampling step (``train.sample_every`` steps, or each eval) the policy completes the first
``train.sample_prompts`` distinct prompts of the eval split, in the split's order, greedily or at
``train.sample_temperature``; :class:`dpo_dist.train.metrics.MetricsLog` writes them to ``samples.jsonl`` and the
trackers, like TRL's ``generate_during_eval``.

Every process generates the same completions, the main process writes them. Under ZeRO-3 and FSDP each forward
gathers the sharded weights, a collective, so every rank must run the same forwards: they do, on the same prompts,
and ``synced_gpus`` keeps a rank that has finished stepping until the others have.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_dist.config import Config
from dpo_dist.distributed import forwards_are_collective
from dpo_dist.model.generation import generation_config, sample_batch


def held_out_prompts(eval_tok: Any, n: int) -> list[list[int]]:
    """The first ``n`` distinct prompts of the tokenized eval split, as token ids (a prompt with several pairs once)."""
    seen: dict[tuple[int, ...], None] = {}
    for ids in eval_tok["prompt_input_ids"]:
        seen.setdefault(tuple(ids), None)
        if len(seen) == n:
            break
    return [list(ids) for ids in seen]


def sampling_step(step: int, total_steps: int, evaluated: bool, cfg: Config) -> bool:
    """Whether ``step`` generates samples: every ``sample_every`` steps and the last, or each eval step."""
    t = cfg.train
    if not t.sample_prompts:
        return False
    if t.sample_every is None:
        return evaluated
    return step % t.sample_every == 0 or step == total_steps


@torch.no_grad()
def generate_samples(model: Any, tokenizer: Any, prompts: list[list[int]], cfg: Config, accelerator: Any,
                     step: int) -> list[dict[str, Any]]:
    """``{"step", "prompt", "completion"}`` for each prompt (decoded text, special tokens dropped). The training
    random state is left as it was: sampling draws from a forked generator seeded by ``train.seed`` and ``step``."""
    t = cfg.train
    config = generation_config(tokenizer, max_new_tokens=t.sample_max_new_tokens,
                               temperature=t.sample_temperature if t.sample_temperature > 0 else None)
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():
            responses = [group[0] for group in sample_batch(accelerator.unwrap_model(model), prompts, config,
                                                            accelerator.device, seed=t.seed + step,
                                                            synced_gpus=forwards_are_collective(accelerator))]
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [{"step": step, "prompt": p, "completion": c, "completion_ids": r}
            for p, c, r in zip(texts, completions, responses)]
