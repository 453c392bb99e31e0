"""A batch of pairs (or rankings) to the mean preference loss and per-example statistics: policy log-probs, reference
log-probs, loss."""

from __future__ import annotations

from typing import Any

import torch

from dpo_dist.config import Config
from dpo_dist.loss_types import LOSSES
from dpo_dist.train.logprobs import group_logps, pair_logps
from dpo_dist.train.loss import length_desensitized_logps, preference_loss, ranking_loss, wpo_weights
from dpo_dist.train.metrics import ranking_counts
from dpo_dist.train.reference import batch_reference_group_logps, batch_reference_logps


def pair_losses(model: Any, batch: dict[str, torch.Tensor], cfg: Config, reference_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss of a batch of B pairs and their statistics.

    The loss sees the policy's summed log-probs (LD-DPO's weighted sums with ``loss.ld_alpha``, for the reference too;
    length-averaged for simpo and orpo); ``logps/chosen`` and ``logps/rejected`` are the plain sums.

    Shape: -> loss (), stats (B, len(STATS)).
    """
    settings = cfg.loss
    types = settings.types()
    ld_alpha = settings.ld_alpha
    policy = pair_logps(model, batch, chunk_size=cfg.train.logps_chunk_size, shared=ld_alpha is not None,
                        aligned=settings.use_weighting)
    ref_chosen, ref_rejected = batch_reference_logps(
        cfg.reference.mode, reference_model, batch, chunk_size=cfg.train.logps_chunk_size, ld_alpha=ld_alpha
    )
    policy_chosen, policy_rejected = policy.chosen_logps, policy.rejected_logps
    if ld_alpha is not None:
        policy_chosen = length_desensitized_logps(policy.chosen_shared_logps, policy_chosen, ld_alpha)
        policy_rejected = length_desensitized_logps(policy.rejected_shared_logps, policy_rejected, ld_alpha)
    if any(LOSSES[name].length_averaged for name in types):
        policy_chosen = policy_chosen / policy.chosen_tokens.clamp(min=1)
        policy_rejected = policy_rejected / policy.rejected_tokens.clamp(min=1)
    weights = None
    if settings.use_weighting:
        weights = wpo_weights(policy.chosen_aligned_logps, policy.chosen_tokens, policy.rejected_aligned_logps,
                              policy.rejected_tokens)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=settings.beta, loss_type=types,
        loss_weights=settings.loss_weights, label_smoothing=settings.label_smoothing, simpo_gamma=settings.simpo_gamma,
        discopop_tau=settings.discopop_tau, f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef, chosen_tokens=policy.chosen_tokens,
        rejected_tokens=policy.rejected_tokens, pair_weights=weights, sft_chosen_logps=policy.chosen_logps,
    )
    if settings.rpo_alpha:
        losses = losses + settings.rpo_alpha * -(policy.chosen_logps / policy.chosen_tokens.clamp(min=1))
    tokens = batch["pair_tokens"]  # each pair as two sequences (the prompt twice), whichever collator made the batch
    stats = torch.stack([
        losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
        policy.chosen_logps.detach(), policy.rejected_logps.detach(), tokens.float(),
    ], dim=1)
    return losses.mean(), stats


def ranking_losses(model: Any, batch: dict[str, torch.Tensor], cfg: Config,
                   reference_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean listwise loss of a batch of G rankings (``data.responses=ranking``: groups of k responses, best first)
    and their statistics: :data:`~dpo_dist.config.STATS` read on each group's best and worst response (so
    ``rewards/chosen`` is the best's reward, ``rewards/rejected`` the worst's, ``rewards/accuracies`` whether the best
    is above the worst; a group of 2 gives a pair's numbers), then its
    :func:`~dpo_dist.train.metrics.ranking_counts`. Each group counts once in the mean, whatever its k.

    Shape: -> loss (), stats (G, len(STATS) + len(RANKING_COUNTS)).
    """
    settings = cfg.loss
    policy = group_logps(model, batch, chunk_size=cfg.train.logps_chunk_size)
    ref = batch_reference_group_logps(cfg.reference.mode, reference_model, batch,
                                      chunk_size=cfg.train.logps_chunk_size)
    losses, rewards = ranking_loss(policy.logps, ref, policy.mask, beta=settings.beta, loss_type=settings.types()[0],
                                   ranking_top_m=settings.ranking_top_m, f_divergence_type=settings.f_divergence_type,
                                   f_alpha_divergence_coef=settings.f_alpha_divergence_coef)
    worst = (policy.mask.sum(dim=1) - 1)[:, None]  # each group's last response present (responses fill from 0)
    best_rewards, worst_rewards = rewards[:, 0], rewards.gather(1, worst)[:, 0]
    logps = policy.logps.detach()
    stats = torch.cat([torch.stack([
        losses.detach(), best_rewards, worst_rewards, (best_rewards > worst_rewards).float(), logps[:, 0],
        logps.gather(1, worst)[:, 0], batch["group_tokens"].float(),
    ], dim=1), ranking_counts(rewards, policy.mask)], dim=1)
    return losses.mean(), stats


def batch_losses(model: Any, batch: dict[str, torch.Tensor], cfg: Config,
                 reference_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ranking_losses` with ``data.responses=ranking``, else :func:`pair_losses`."""
    if cfg.data.responses == "ranking":
        return ranking_losses(model, batch, cfg, reference_model)
    return pair_losses(model, batch, cfg, reference_model)
