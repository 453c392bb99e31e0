"""dpo-dist: a distributed DPO trainer on accelerate.

The package follows the data flow, one subpackage a stage, each importing only from earlier stages and from the two
cross-cutting modules at the top (``config``: the typed config; ``distributed``: the Accelerator and sharding):

1. ``data``: pairs loaded and validated, tokenized, ordered, collated or packed into batches;
2. ``model``: the policy, tokenizer and reference copy loaded (full, LoRA, QLoRA), the single-device fallback, a
   trained run loaded back, merged, uploaded;
3. ``train``: log-probs, losses, reference log-probs and their cache, the loop, checkpoints, metrics;
4. ``eval``: a trained run against its base (held-out metrics, sampled win rate, KL), the report, chat.

Importing the package imports none of them, so ``import dpo_dist`` is light (no DeepSpeed, no bitsandbytes).
"""

__version__ = "0.1.0"
