"""The best eval metric and early stopping: ``train.metric_for_best``, ``train.greater_is_better`` and
``train.early_stopping_patience`` applied to each eval's record, kept in the checkpointed
:class:`~dpo_dist.train.checkpoint.TrainState` (so a resumed run goes on counting where it stopped).

Which checkpoint is the best, and that ``model/`` gets its weights with early stopping, is the trainer's and
:mod:`dpo_dist.train.final`'s; this module only says whether an eval improved and when patience ran out.
"""

from __future__ import annotations

from dpo_dist.config import Config
from dpo_dist.train.checkpoint import TrainState


def stopped_early(state: TrainState, cfg: Config) -> str | None:
    """The early-stopping message if the state resumed from had run out of patience already (its run stopped there;
    what is left is the export), else None."""
    t = cfg.train
    if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
        return (f"stopped early at step {state.global_step} already: {t.metric_for_best} had not improved on "
                f"{state.best_metric:.4f} for {state.evals_without_improvement} evals")
    return None


def track_best(state: TrainState, record: dict[str, float], cfg: Config) -> tuple[bool, str | None]:
    """Update the best eval metric; returns (improved, a stop message when patience ran out)."""
    t = cfg.train
    value = record[t.metric_for_best]
    better = state.best_metric is None or (value > state.best_metric if t.greater_is_better else value < state.best_metric)
    if better:
        state.best_metric, state.evals_without_improvement = value, 0
        return True, None
    state.evals_without_improvement += 1
    if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
        return False, (f"early stopping at step {state.global_step}: {t.metric_for_best} has not improved on "
                       f"{state.best_metric:.4f} for {state.evals_without_improvement} evals")
    return False, None
