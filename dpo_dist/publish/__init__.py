"""Stage 6, publishing: a trained run as others get it.

Takes what the earlier stages wrote, read through their own readers; gives the model card (``README.md`` with the
Hub's metadata), a checkpoint's weights as a model folder, a LoRA adapter merged into its base, and the upload to
the Hub. The last stage, so that it may report on every other one (training's metrics, evaluation's results).
"""
