"""Stage 3, training: batches to log-probs, log-probs to the preference loss, the loop, checkpoints and metrics.

Takes tokenized pairs and a model; gives reference log-probs (precomputed and cached, online or none), optimizer steps,
``metrics.jsonl``, checkpoints that resume, and the final model in ``<output_dir>/model``.
"""
