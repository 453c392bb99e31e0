"""What an evaluation is asked for: :class:`EvalOptions` (``launch/evaluate.py``'s options, whose defaults are the
dataclass's), with its :class:`~dpo_dist.model.generation.Sampling`, and the LLM judge's default instruction.

Nothing here imports torch, so ``launch/evaluate.py --help`` reads its defaults from here and still answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpo_dist.model.generation import Sampling

JUDGE_INSTRUCTION = (
    "Compare two responses to the same prompt. Decide which response is better: more helpful, more accurate, "
    "better written and more appropriate. Length alone is not a reason to prefer a response."
)


@dataclass
class EvalOptions:
    judge: str = "auto"  # one of config.JUDGE_KINDS, or none; auto: a rounds run's own judge, sentiment for the sentiment task
    samples_per_prompt: int = 4
    num_prompts: int | None = None  # held-out prompts used (all by default)
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int | None = None  # None: the sentiment task's length, else 128
    batch_size: int = 16
    base: str | None = None
    eval_source: str | None = None
    prompts: str | None = None  # a JSON-lines file of {"prompt": ...} to generate from instead of the held-out prompts
    judge_instruction: str = JUDGE_INSTRUCTION
    seed: int = 0
