"""A batch of pairs to the mean preference loss and per-pair statistics: policy log-probs, reference log-probs, loss."""

from __future__ import annotations

from typing import Any

import torch

from dpo_dist.config import Config
from dpo_dist.train.logprobs import pair_logps
from dpo_dist.train.loss import LENGTH_AVERAGED, preference_loss
from dpo_dist.train.reference import batch_reference_logps


def pair_losses(model: Any, batch: dict[str, torch.Tensor], cfg: Config, reference_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss of a batch of B pairs and their statistics.

    Shape: -> loss (), stats (B, len(STATS)).
    """
    policy = pair_logps(model, batch, chunk_size=cfg.train.logps_chunk_size)
    ref_chosen, ref_rejected = batch_reference_logps(
        cfg.reference.mode, reference_model, batch, chunk_size=cfg.train.logps_chunk_size
    )
    policy_chosen, policy_rejected = policy.chosen_logps, policy.rejected_logps
    if cfg.loss.loss_type in LENGTH_AVERAGED:
        policy_chosen = policy_chosen / policy.chosen_tokens.clamp(min=1)
        policy_rejected = policy_rejected / policy.rejected_tokens.clamp(min=1)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=cfg.loss.beta, loss_type=cfg.loss.loss_type,
        label_smoothing=cfg.loss.label_smoothing, simpo_gamma=cfg.loss.simpo_gamma,
    )
    if cfg.loss.rpo_alpha:
        losses = losses + cfg.loss.rpo_alpha * -(policy.chosen_logps / policy.chosen_tokens.clamp(min=1))
    tokens = batch["pair_tokens"]  # each pair as two sequences (the prompt twice), whichever collator made the batch
    stats = torch.stack([
        losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
        policy.chosen_logps.detach(), policy.rejected_logps.detach(), tokens.float(),
    ], dim=1)
    return losses.mean(), stats
