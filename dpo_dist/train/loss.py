"""Preference losses: pure functions of four log-prob tensors (and, for a few losses, token counts).

Notation: for each pair, ``r_c = policy_chosen_logps - ref_chosen_logps`` and ``r_r`` (the same on the rejected side)
are the policy's log-ratios to the reference, log-probs summed over response tokens; ``n_c``, ``n_r`` the response
tokens. The f-divergence (below) turns each log-ratio into a score ``s = f'(r)``; ``h = s_c - s_r`` (with the default
``reverse_kl``, ``s = r`` and ``h`` is DPO's log-ratio difference). ``sigma`` is the logistic function, ``beta`` the
strength of the KL constraint, ``e`` = ``label_smoothing``.

=============  ==================================================================  ====================================
loss_type      per-pair loss                                                       source (arXiv)
=============  ==================================================================  ====================================
sigmoid        -log sigma(beta h); with e (cDPO):                                  DPO, Rafailov et al. 2023, eq. 7
               -(1 - e) log sigma(beta h) - e log sigma(-beta h)                   (2305.18290); cDPO, Mitchell 2023
robust         [-(1 - e) log sigma(beta h) + e log sigma(-beta h)] / (1 - 2e)      rDPO, Chowdhury et al. 2024
                                                                                   (2403.00409)
hinge          max(0, 1 - beta h)                                                  SLiC-HF, Zhao et al. 2023
                                                                                   (2305.10425); RSO (2309.06657)
ipo            (h - 1 / (2 beta))^2                                                IPO, Azar et al. 2023, eq. 17
                                                                                   (2310.12036)
simpo          -log sigma(beta (avg_c - avg_r) - gamma), no reference              SimPO, Meng et al. 2024, eq. 6
                                                                                   (2405.14734)
exo_pair       KL(q || p): q = (sigma(beta h), sigma(-beta h)), p = (1 - e, e):    EXO, Ji et al. 2024, eq. 16
               q_1 (log q_1 - log(1 - e)) + q_2 (log q_2 - log e), e > 0           (2402.00856)
nca_pair       -log sigma(beta s_c) - 1/2 log sigma(-beta s_c)                     NCA, Chen et al. 2024, pairwise
               - 1/2 log sigma(-beta s_r)                                          (2402.05369)
bco_pair       -log sigma(beta s_c) - log sigma(-beta s_r)                         BCO, Jung et al. 2024, reward
                                                                                   shift 0 (2404.04656)
sppo_hard      (s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2                     SPPO, Wu et al. 2024, eq. 4.7 with
                                                                                   P = 1 for chosen, 0 (2405.00675)
aot            -(1 - e) log sigma(beta d) - e log sigma(-beta d),                  AOT, Melnyk et al. 2024, paired
               d_i = sort(logp_c - logp_r)_i - sort(ref_c - ref_r)_i               (2406.05882)
aot_unpaired   as aot with d_i = sort(r_c)_i - sort(r_r)_i                         AOT, unpaired (2406.05882)
apo_zero       (1 - sigma(beta r_c)) + sigma(beta r_r)                             APO, D'Oosterlinck et al. 2024,
                                                                                   eq. 7 (2408.06266)
apo_down       sigma(beta r_c) + (1 - sigma(beta h))                               APO, eq. 8 (2408.06266)
discopop       (1 - m) (-log sigma(beta h)) + m exp(-beta h),                      DiscoPOP (LRML), Lu et al. 2024,
               m = sigma(beta h / tau)                                             eq. 5 (2406.08414)
sft            -logp_c / n_c  (the chosen response's NLL per token)                supervised fine-tuning term
sigmoid_norm   -log sigma(beta (s_c / n_c - s_r / n_r))                            DPO on per-token log-ratios: SimPO
                                                                                   app. "DPO w/ LN" (2405.14734)
orpo           -avg_c - beta log sigma(log odds(avg_c) - log odds(avg_r)),         ORPO, Hong et al. 2024, eqs. 4, 6, 7
               log odds(a) = a - log(1 - e^a), no reference                        (2403.07691); beta is its lambda
=============  ==================================================================  ====================================

``avg`` is a log-prob averaged over its response tokens (``LENGTH_AVERAGED`` types take averaged log-probs).

Modifiers (each may be combined with any loss above that has a reference, unless said):

==================  ==========================================================  =======================================
f_divergence_type   score s = f'(r), constants dropped                          f-DPO, Wang et al. 2023 (2309.16240)
==================  ==========================================================  =======================================
reverse_kl          r (plain DPO)
forward_kl          -exp(-r)
js_divergence       log sigma(r)  (log(2t / (1 + t)) without log 2)
alpha_divergence    exp((a - 1) r) / (a - 1), a = f_alpha_divergence_coef;
                    a = 1: r
==================  ==========================================================  =======================================

- Weighted combinations (as MPO, Wang et al. 2024, 2411.10442): ``loss_type`` a sequence with ``loss_weights``; the per-pair
  loss is ``sum_k w_k loss_k``.
- LD-DPO (Liu et al. 2024, 2409.06411): each side's log-prob is ``logp_shared + ld_alpha logp_tail``, where the shared
  part covers the first ``min(n_c, n_r)`` response tokens; :func:`length_desensitized_logps`. Applied before the loss,
  to policy and reference alike.
- WPO (Zhou et al. 2024, eq. 2, 2406.11827): each pair's loss is multiplied by a detached weight ``w_c w_r``; :func:`wpo_weights`.

Rewards are ``beta * (policy_logps - ref_logps)`` per side (``beta * avg_logps`` for simpo and orpo), detached.
``ref_*_logps=None`` means reference-free: the reference log-probs are taken as 0.
The RPO term (an NLL on the chosen response, weighted by ``rpo_alpha``) is added by the caller.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "simpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "orpo",
)
# Loss types that take length-averaged log-probs (log-prob sum / response tokens) instead of sums.
LENGTH_AVERAGED = frozenset({"simpo", "orpo"})
# Loss types that never use a reference model.
REFERENCE_FREE = frozenset({"simpo", "orpo"})
# Loss types that use label_smoothing (exo_pair needs it above 0).
SMOOTHED = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
# Loss types that sort the batch: a pair's loss depends on the other pairs of its batch.
SORTED = frozenset({"aot", "aot_unpaired"})
# Loss types that take the response token counts.
NEEDS_TOKENS = frozenset({"sft", "sigmoid_norm"})
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (the branch at -ln 2, Maechler 2012). Shape: any -> same."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> torch.Tensor:
    """The score ``f'(exp(r))`` that replaces the log-ratio ``r`` under an f-divergence regularizer (f-DPO, Wang et al.
    2023; constants, which cancel in ``s_c - s_r``, dropped). ``alpha``: the alpha-divergence's coefficient.

    Shape: logratios (B,) -> (B,).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return -torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1); a = 1 is the log
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        wide = torch.promote_types(logratios.dtype, torch.float32)  # at least fp32, where exp(80) is finite
        exponent = torch.clamp(((alpha - 1.0) * logratios).to(wide), max=80.0)
        return (torch.exp(exponent) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of {F_DIVERGENCES}")


def length_desensitized_logps(shared_logps: torch.Tensor, logps: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's log-prob of a response (Liu et al. 2024, 2409.06411): the tokens both responses of the pair have (the first
    ``min(n_c, n_r)``) count fully, the longer response's excess tokens with weight ``ld_alpha`` in [0, 1].

    ``shared_logps``: log-probs summed over the first ``min(n_c, n_r)`` response tokens; ``logps``: over all of them.
    Shape: each (B,) -> (B,).
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    return shared_logps + ld_alpha * (logps - shared_logps)


def wpo_weights(chosen_aligned_logps: torch.Tensor, chosen_tokens: torch.Tensor, rejected_aligned_logps: torch.Tensor,
                rejected_tokens: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, eq. 2, with the sampling-aligned per-token probability of their section 3.2,
    as TRL): ``w = exp(mean_t a_t) `` per response, ``a_t = log p(y_t) - log sum_v p(v)^2`` at each response token, and
    the pair's weight is ``w_c w_r``, detached.

    ``*_aligned_logps``: ``sum_t a_t`` over the response (:func:`dpo_dist.train.logprobs.pair_logps` with
    ``aligned=True``); ``*_tokens``: the response tokens. Shape: each (B,) -> (B,).
    """
    chosen = chosen_aligned_logps / chosen_tokens.clamp(min=1)
    rejected = rejected_aligned_logps / rejected_tokens.clamp(min=1)
    return torch.exp(chosen + rejected).detach()


def as_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(loss types, weights)`` of a single loss type or a weighted combination; a ValueError for an unknown name,
    weights of another length, or a combination that cannot be made."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list: give at least one of " + ", ".join(LOSS_TYPES))
    for name in types:
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is not one of {', '.join(LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type {list(types)} names a loss twice; give it one weight instead")
    weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(types)} loss types {list(types)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"loss_weights must not be negative, got {list(weights)}")
    averaged = [t for t in types if t in LENGTH_AVERAGED]
    if averaged and len(types) > 1:
        raise ValueError(f"{averaged[0]} takes length-averaged log-probs and no reference: it cannot be combined with "
                         "other loss types (its own NLL term is built in)")
    return types, weights


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and detached rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: the policy's log-probs of each response, summed over its tokens
            (for ``simpo`` and ``orpo``: averaged over its tokens; see ``LENGTH_AVERAGED``).
        ref_chosen_logps, ref_rejected_logps: the reference's, the same way; None for reference-free (``simpo``
            and ``orpo`` require None).
        beta: KL strength (for ``simpo``, the reward scale; for ``orpo``, the odds-ratio term's weight lambda).
        loss_type: one of ``LOSS_TYPES``, or a sequence of them combined with ``loss_weights`` (default all 1).
        label_smoothing: e, for the ``SMOOTHED`` losses: the assumed label-flip probability (``sigmoid``: cDPO,
            ``robust``, ``aot``), EXO's target probability of the rejected side (``exo_pair``, must be above 0).
        simpo_gamma: SimPO's target reward margin gamma.
        discopop_tau: DiscoPOP's temperature tau.
        f_divergence_type, f_alpha_divergence_coef: the f-divergence regularizer (:func:`f_divergence_scores`).
        chosen_tokens, rejected_tokens: response tokens per side, for ``sft`` and ``sigmoid_norm``.
        pair_weights: a detached weight per pair multiplying its loss (WPO, :func:`wpo_weights`); not with ``aot``
            and ``aot_unpaired``, which sort pairs.

    Where this differs from TRL 1.x's DPOTrainer:

    - ``ipo`` takes summed log-ratios, as Azar et al. define h on sequence log-likelihoods, so that h and the
      rewards mean the same for every loss type here. TRL averages them over tokens, after the IPO authors' later
      advice; ``sigmoid_norm`` is the sigmoid loss on such averages, and passing length-averaged log-probs (and
      references) to ``ipo`` gives TRL's.
    - ``sigmoid`` takes ``label_smoothing`` (cDPO), as TRL's did before 1.0; TRL's ignores it now.
    - ``sft`` is each pair's NLL per chosen token; TRL's is the cross-entropy over all chosen tokens of the batch (one
      number for the batch: a token-weighted mean where ours weights pairs equally).
    - ``orpo``'s NLL is over the chosen response's tokens (the paper's L_SFT, eq. 6); TRL's ORPOTrainer takes it
      over prompt and response.
    - ``aot`` and ``aot_unpaired`` sort log-ratios within the batch given: under data parallelism that is each
      process's micro-batch, not the global batch (TRL sorts per device too), so the loss depends on
      ``per_device_batch_size`` and on how pairs are dealt to processes.

    Shape: each input (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    types, weights = as_types(loss_type, loss_weights)
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and not SMOOTHED & set(types):
        raise ValueError(f"label_smoothing applies to the {', '.join(sorted(SMOOTHED))} losses, not {list(types)}")
    if "exo_pair" in types and label_smoothing <= 0:
        raise ValueError("exo_pair needs label_smoothing above 0 (log e of the target distribution); EXO suggests 1e-3")
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of {F_DIVERGENCES}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    free = [t for t in types if t in REFERENCE_FREE]
    if free and ref_chosen_logps is not None:
        raise ValueError(f"{free[0]} is reference-free: pass ref_chosen_logps=ref_rejected_logps=None")
    if free and f_divergence_type != "reverse_kl":
        raise ValueError(f"f_divergence_type regularizes the log-ratio to a reference; {free[0]} has none")
    if NEEDS_TOKENS & set(types) and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"{sorted(NEEDS_TOKENS & set(types))} need chosen_tokens and rejected_tokens")
    if pair_weights is not None and SORTED & set(types):
        raise ValueError("WPO weighting is not defined for aot and aot_unpaired: they sort pairs, so a pair's loss is "
                         "not its own and a per-pair weight would weigh another pair's term")

    ref_free = ref_chosen_logps is None
    chosen_logratios = policy_chosen_logps if ref_free else policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps if ref_free else policy_rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    h = chosen_scores - rejected_scores
    e = label_smoothing

    def smoothed_sigmoid(x: torch.Tensor) -> torch.Tensor:
        return -(1 - e) * F.logsigmoid(beta * x) - e * F.logsigmoid(-beta * x)

    total = torch.zeros_like(h)
    for name, weight in zip(types, weights):
        if name == "sigmoid":
            losses = smoothed_sigmoid(h)
        elif name == "robust":
            losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
        elif name == "hinge":
            losses = torch.relu(1 - beta * h)
        elif name == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        elif name == "simpo":
            losses = -F.logsigmoid(beta * h - simpo_gamma)
        elif name == "exo_pair":
            q_chosen, q_rejected = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
            losses = (q_chosen * (F.logsigmoid(beta * h) - math.log1p(-e))
                      + q_rejected * (F.logsigmoid(-beta * h) - math.log(e)))
        elif name == "nca_pair":
            losses = (-F.logsigmoid(beta * chosen_scores) - 0.5 * F.logsigmoid(-beta * chosen_scores)
                      - 0.5 * F.logsigmoid(-beta * rejected_scores))
        elif name == "bco_pair":
            losses = -F.logsigmoid(beta * chosen_scores) - F.logsigmoid(-beta * rejected_scores)
        elif name == "sppo_hard":
            losses = (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
        elif name == "aot":
            ref_margin = torch.zeros_like(h) if ref_free else ref_chosen_logps - ref_rejected_logps
            delta = (torch.sort(policy_chosen_logps - policy_rejected_logps).values
                     - torch.sort(ref_margin).values)
            losses = smoothed_sigmoid(delta)
        elif name == "aot_unpaired":
            losses = smoothed_sigmoid(torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values)
        elif name == "apo_zero":
            losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":
            losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * h))
        elif name == "discopop":
            modulation = torch.sigmoid(beta * h / discopop_tau)
            losses = -F.logsigmoid(beta * h) * (1 - modulation) + torch.exp(-beta * h) * modulation
        elif name == "sft":
            losses = -policy_chosen_logps / chosen_tokens.clamp(min=1)
        elif name == "sigmoid_norm":
            losses = -F.logsigmoid(beta * (chosen_scores / chosen_tokens.clamp(min=1)
                                           - rejected_scores / rejected_tokens.clamp(min=1)))
        else:  # orpo: length-averaged log-probs, no reference
            log_odds = (policy_chosen_logps - policy_rejected_logps) - (
                log1mexp(policy_chosen_logps) - log1mexp(policy_rejected_logps))
            losses = -policy_chosen_logps - beta * F.logsigmoid(log_odds)
        total = total + weight * losses
    if pair_weights is not None:
        total = total * pair_weights.detach()

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return total, chosen_rewards, rejected_rewards
