"""The evaluation metrics as local ``evaluate`` modules, loaded by path.

``evaluate.load("accuracy")`` fetches the metric's script from the Hugging Face Hub, which fails offline and on
air-gapped clusters; ``evaluate.load(<folder>)`` runs the script in the folder and needs no network. Each folder here
is one module (``<name>/<name>.py``).
"""

from __future__ import annotations

import os
from typing import Any

NAMES = ("accuracy", "win_rate")


def load_metric(name: str) -> Any:
    """The local ``evaluate`` module ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ValueError(f"no local metric {name!r}; the local metrics are {NAMES}")
    try:
        import evaluate
    except ImportError:
        raise ImportError("evaluation needs the evaluate package: python3 -m pip install evaluate") from None
    return evaluate.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))
