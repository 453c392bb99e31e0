"""Stage 4, evaluation: a trained run against its base, and a conversation with it.

Takes a run's output folder; gives held-out preference metrics, sampled responses judged for a win rate, a KL
estimate, and the report (JSON, markdown, plot); ``chat`` talks to the trained model.
"""
