"""Stage 5, rounds: iterative DPO (``rounds.count`` > 1). Each round samples completions of the training prompts
from the policy of the round's start, judges them with evaluation's judges, pairs them, trains on the pairs, and
evaluates the policy on held-out prompts; it drives the training loop and the judges, so it comes after both."""
