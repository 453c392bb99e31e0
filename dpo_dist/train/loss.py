"""Preference losses: pure functions of four log-prob tensors.

Notation: for each pair, ``h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)``
is the difference of the policy's log-ratios to the reference on the chosen and the rejected response, log-probs being
summed over response tokens. ``sigma`` is the logistic function, ``beta`` the strength of the KL constraint.

==========  ==========================================================================  ==============================
loss_type   per-pair loss                                                               source
==========  ==========================================================================  ==============================
sigmoid     -log sigma(beta h); with label_smoothing e (cDPO):                          Rafailov et al. 2023, eq. 7;
            -(1 - e) log sigma(beta h) - e log sigma(-beta h)                           Mitchell 2023 (cDPO)
robust      [-(1 - e) log sigma(beta h) + e log sigma(-beta h)] / (1 - 2e)              Chowdhury et al. 2024 (rDPO)
hinge       max(0, 1 - beta h)                                                          Zhao et al. 2023 (SLiC-HF)
ipo         (h - 1 / (2 beta))^2                                                        Azar et al. 2023 (IPO)
simpo       -log sigma(beta (avg_chosen - avg_rejected) - gamma), no reference          Meng et al. 2024 (SimPO)
==========  ==========================================================================  ==============================

Rewards are ``beta * (policy_logps - ref_logps)`` per side (``beta * avg_logps`` for simpo), detached.
``ref_*_logps=None`` means reference-free: the reference log-probs are taken as 0.
The RPO term (an NLL on the chosen response, weighted by ``rpo_alpha``) is added by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
# Loss types that take length-averaged log-probs (log-prob sum / response tokens) instead of sums.
LENGTH_AVERAGED = frozenset({"simpo"})
# Loss types that never use a reference model.
REFERENCE_FREE = frozenset({"simpo"})


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and detached rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: the policy's log-probs of each response, summed over its tokens
            (for ``simpo``: averaged over its tokens; see ``LENGTH_AVERAGED``).
        ref_chosen_logps, ref_rejected_logps: the reference's, the same way; None for reference-free (``simpo``
            requires None).
        beta: KL strength (for ``simpo``, the reward scale).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: the assumed probability e that a label is flipped, for ``sigmoid`` (cDPO) and ``robust``.
        simpo_gamma: SimPO's target reward margin gamma.

    ``ipo`` takes summed log-ratios, as Azar et al. define h on sequence log-likelihoods, so that h and
    the rewards mean the same for every loss type here. TRL averages them over tokens instead, after the IPO
    authors' later advice that this works better; pass length-averaged log-probs (and references) to get that.

    Shape: each input (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type!r}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if loss_type in REFERENCE_FREE and ref_chosen_logps is not None:
        raise ValueError(f"{loss_type} is reference-free: pass ref_chosen_logps=ref_rejected_logps=None")

    chosen_logratios = policy_chosen_logps if ref_chosen_logps is None else policy_chosen_logps - ref_chosen_logps
    rejected_logratios = (
        policy_rejected_logps if ref_rejected_logps is None else policy_rejected_logps - ref_rejected_logps
    )
    h = chosen_logratios - rejected_logratios
    e = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # simpo
        losses = -F.logsigmoid(beta * h - simpo_gamma)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
