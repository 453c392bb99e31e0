"""Stage 2, model: the policy, its tokenizer and its reference, as the launch can hold them.

Takes the config; gives the model loaded (full, LoRA or 4-bit QLoRA, dropout off), the built-in SmolLM2, and, after
training, a run's model loaded back or merged into its base.
"""
