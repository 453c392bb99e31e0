"""dpo-dist: a distributed DPO trainer on accelerate.

The package follows the data flow, one subpackage a stage, each importing only from earlier stages and from the
cross-cutting modules at the top (``config``: the typed config; ``loss_types``: the loss types' records;
``distributed``: the Accelerator and sharding; ``attention_cost``: what packed attention costs; ``launch_policy``: the
single-device fallback):

1. ``data``: pairs loaded and validated, tokenized, ordered, collated or packed into batches;
2. ``model``: the policy, tokenizer and reference copy loaded (full, LoRA, QLoRA), attention for packed rows,
   generation, a trained run loaded back or merged;
3. ``train``: log-probs, losses, reference log-probs and their cache, the loop, checkpoints, metrics, the final model;
4. ``eval``: a trained run against its base (held-out metrics, sampled win rate, KL), the report, chat;
5. ``publish``: the model card, a checkpoint's export, a merged folder, the Hub upload.

Importing the package imports none of them, so ``import dpo_dist`` is light (no DeepSpeed, no bitsandbytes).
"""

__version__ = "0.1.0"
