"""dpo-dist: a distributed DPO trainer on accelerate.

Modules (each with one job): ``formats`` and ``data`` (load and validate pairs), ``tokenization`` and ``collate``
(token ids and batches), ``logprobs`` (sequence log-probs), ``loss`` (preference losses), ``cache`` and
``reference`` (reference log-probs), ``distributed`` (the Accelerator). Importing the package imports none of
them, so ``import dpo_dist`` is light (no DeepSpeed, no bitsandbytes).
"""

__version__ = "0.1.0"
