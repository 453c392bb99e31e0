"""Win rate of a model against a baseline from pairwise judgments, with a bootstrap confidence interval.

Each comparison's outcome is 1 (the model's response won), 0.5 (tie) or 0 (the baseline's won). The win rate is the
mean outcome (a tie counts half). Comparisons of the same prompt are not independent (several samples per prompt
share it), so the interval resamples whole prompts: a percentile bootstrap over ``groups`` (the prompt of each
comparison), seeded, so the same inputs give the same interval.
"""

import random

import datasets
import evaluate

_DESCRIPTION = "Win rate (ties count half) with wins, losses, ties and a prompt-level bootstrap confidence interval."
_KWARGS_DESCRIPTION = """
Args:
    outcomes (list of float): 1 win, 0.5 tie, 0 loss, one per comparison.
    groups (list of int): the prompt of each comparison; the bootstrap resamples prompts.
    confidence (float, default 0.95), resamples (int, default 2000), seed (int, default 0).
Returns:
    win_rate, ci_low, ci_high (float); wins, losses, ties, comparisons, prompts (int).
Example:
    >>> metric.compute(outcomes=[1, 1, 0.5, 0], groups=[0, 0, 1, 1])["win_rate"]
    0.625
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"outcomes": datasets.Value("float64"), "groups": datasets.Value("int64")}),
        )

    def _compute(self, outcomes, groups, confidence=0.95, resamples=2000, seed=0):
        if len(outcomes) == 0:
            raise ValueError("a win rate of no comparisons is undefined")
        bad = [o for o in outcomes if o not in (0.0, 0.5, 1.0)]
        if bad:
            raise ValueError(f"outcomes must be 1 (win), 0.5 (tie) or 0 (loss); got {bad[0]!r}")
        by_group = {}
        for outcome, group in zip(outcomes, groups):
            by_group.setdefault(group, []).append(outcome)
        sums = [(sum(v), len(v)) for v in by_group.values()]
        rng = random.Random(seed)
        rates = []
        for _ in range(resamples):
            picked = [sums[rng.randrange(len(sums))] for _ in sums]
            rates.append(sum(s for s, _ in picked) / sum(n for _, n in picked))
        rates.sort()
        tail = (1 - confidence) / 2
        low = rates[int(tail * resamples)]
        high = rates[min(resamples - 1, int((1 - tail) * resamples))]
        return {
            "win_rate": sum(outcomes) / len(outcomes), "ci_low": low, "ci_high": high,
            "wins": sum(o == 1.0 for o in outcomes), "losses": sum(o == 0.0 for o in outcomes),
            "ties": sum(o == 0.5 for o in outcomes), "comparisons": len(outcomes), "prompts": len(sums),
        }
