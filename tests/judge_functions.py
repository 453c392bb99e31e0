"""Deterministic score judges for tests, named as ``python:tests.judge_functions:FUNCTION`` (importable from the
repository's root, where the tests and the launchers run): ``length_score`` orders completions by length, so a test
knows which completion a judge prefers; the others return what ``dpo_dist.eval.judges.checked_scores`` refuses.

Each takes the prompts and the completions and returns one score per completion, as a ``python:`` judge must.
"""

from __future__ import annotations

import math


def length_score(prompts: list[str], completions: list[str]) -> list[float]:
    """The number of characters of each completion: the longer, the better."""
    return [float(len(c)) for c in completions]


def nan_score(prompts: list[str], completions: list[str]) -> list[float]:
    """Lengths, but NaN for the last completion."""
    return length_score(prompts, completions)[:-1] + [math.nan]


def inf_score(prompts: list[str], completions: list[str]) -> list[float]:
    """Lengths, but inf for the last completion."""
    return length_score(prompts, completions)[:-1] + [math.inf]


def bool_score(prompts: list[str], completions: list[str]) -> list:
    """True or False (is the completion longer than 3 characters?): not a number."""
    return [len(c) > 3 for c in completions]


def text_score(prompts: list[str], completions: list[str]) -> list:
    """Lengths, but the last one written as a string: not a number."""
    return length_score(prompts, completions)[:-1] + [f"{len(completions[-1])}.0"]


def wrong_count(prompts: list[str], completions: list[str]) -> list[float]:
    """One score too few."""
    return length_score(prompts, completions)[:-1]


def one_number(prompts: list[str], completions: list[str]) -> float:
    """One number for the whole batch, not a list."""
    return 1.0


def raises(prompts: list[str], completions: list[str]) -> list[float]:
    """A judge that fails, with a message of two lines."""
    raise RuntimeError("the scoring service is down\nretry later")


def tensor_score(prompts: list[str], completions: list[str]):
    """Lengths as a float64 tensor (arrays and tensors are read as lists)."""
    import torch

    return torch.tensor(length_score(prompts, completions), dtype=torch.float64)


not_a_function = 3
