"""Accuracy: the fraction of predictions equal to their references (a local copy of the Hub's ``accuracy`` metric,
which ``evaluate.load("accuracy")`` would fetch over the network)."""

import datasets
import evaluate

_DESCRIPTION = "The fraction of predictions equal to their references; with sample_weight, the weighted fraction."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    sample_weight (list of float, optional): a weight per example.
Returns:
    accuracy (float): in [0, 1].
Example:
    >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        if len(predictions) == 0:
            raise ValueError("accuracy of no examples is undefined")
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        return {"accuracy": correct / sum(weights)}
