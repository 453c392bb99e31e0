"""Preference losses: pure functions of four log-prob tensors (and, for a few losses, token counts); ranking losses,
of two: the policy's and the reference's log-probs of groups of ranked responses.

Notation: for each pair, ``r_c = policy_chosen_logps - ref_chosen_logps`` and ``r_r`` (the same on the rejected side)
are the policy's log-ratios to the reference, log-probs summed over response tokens; ``n_c``, ``n_r`` the response
tokens. The f-divergence (below) turns each log-ratio into a score ``s = f'(r)``; ``h = s_c - s_r`` (with the default
``reverse_kl``, ``s = r`` and ``h`` is DPO's log-ratio difference). ``sigma`` is the logistic function, ``beta`` the
strength of the KL constraint, ``e`` = ``label_smoothing``.

=============  ==================================================================  ====================================
loss_type      per-pair loss (listwise types: per ranked group)                    source (arXiv)
=============  ==================================================================  ====================================
sigmoid        -log sigma(beta h); with e (cDPO):                                  DPO, Rafailov et al. 2023, eq. 7
               -(1 - e) log sigma(beta h) - e log sigma(-beta h)                   (2305.18290); cDPO, Mitchell 2023
robust         [-(1 - e) log sigma(beta h) + e log sigma(-beta h)] / (1 - 2e)      rDPO, Chowdhury et al. 2024
                                                                                   (2403.00409)
hinge          max(0, 1 - beta h)                                                  SLiC-HF, Zhao et al. 2023
                                                                                   (2305.10425); RSO (2309.06657)
ipo            (s_c / n_c - s_r / n_r - 1 / (2 beta))^2                            IPO, Azar et al. 2023, eq. 17 on
                                                                                   per-token log-ratios (2310.12036)
ipo_sum        (h - 1 / (2 beta))^2                                                IPO, eq. 17 as printed (2310.12036)
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
sft            -sum_batch logp_c / sum_batch n_c (NLL per chosen token of the      supervised fine-tuning term
               micro-batch; the same for each of its pairs)
sigmoid_norm   -log sigma(beta (s_c / n_c - s_r / n_r))                            DPO on per-token log-ratios: SimPO
                                                                                   app. "DPO w/ LN" (2405.14734)
orpo           -avg_c - beta log sigma(log odds(avg_c) - log odds(avg_r)),         ORPO, Hong et al. 2024, eqs. 4, 6, 7
               log odds(a) = a - log(1 - e^a), no reference                        (2403.07691); beta is its lambda
plackett_luce  -sum_{j=1..m} [beta s_j - log sum_{l=j..k} exp(beta s_l)]           DPO, Rafailov et al. 2023, app. A.3
               over a group of k responses ranked best first (listwise)            (2305.18290), Plackett-Luce
=============  ==================================================================  ====================================

``avg`` is a log-prob averaged over its response tokens (the ``length_averaged`` types take averaged log-probs).
The listwise types (``plackett_luce``) take a ranking instead of a pair: a group of k responses to one prompt, ranked
best first, ``s_j`` the score of the j-th (``s_j = r_j`` with ``reverse_kl``), ``m`` = ``ranking_top_m`` (default k - 1,
the whole ranking: the last choice, from one response, is certain and adds 0).

Each loss type is a record in :data:`dpo_dist.loss_types.LOSSES` (what it takes, which options and loss types go with it)
and a function here: per pair, ``PER_PAIR[name]`` (:func:`preference_loss` checks the options against the records and
looks the functions up), or per ranked group for the listwise types, ``PER_GROUP[name]`` (:func:`ranking_loss`).

Modifiers (each may be combined with any loss above that has a reference, unless said):

==================  ==========================================================  =======================================
f_divergence_type   score s = f'(t) at t = exp(r)                               f-DPO, Wang et al. 2023 (2309.16240)
==================  ==========================================================  =======================================
reverse_kl          r (plain DPO)
forward_kl          1 - exp(-r)
js_divergence       log 2 + log sigma(r)  (log(2t / (1 + t)))
alpha_divergence    (exp((a - 1) r) - 1) / (a - 1), a = f_alpha_divergence_coef;
                    a = 1: r
==================  ==========================================================  =======================================

The constants of f' cancel in h = s_c - s_r, not in ``ipo`` and ``sigmoid_norm``, which divide each side by its own
length. An f-divergence applies to the loss types whose record says so (``LossType.f_divergence``); the others are
refused (their loss reads a side alone, where f-DPO's beta log Z(x) does not cancel).

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
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dpo_dist.loss_types import F_DIVERGENCES, LOSSES, LossWording, check_loss_options

# preference_loss's and ranking_loss's messages name their arguments (the config's name its keys).
ARGUMENT_WORDING = LossWording(option="{}", loss_types="{n} loss types {types}",
                               no_reference="pass ref_chosen_logps=ref_rejected_logps=None", weighting="WPO weighting",
                               ranking="groups of ranked responses: ranking_loss", pairs="pairs: preference_loss")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (the branch at -ln 2, Maechler 2012). Shape: any -> same."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> torch.Tensor:
    """The score ``f'(exp(r))`` that replaces the log-ratio ``r`` under an f-divergence regularizer (f-DPO, Wang et al.
    2023; constants, which cancel in ``s_c - s_r``, dropped). ``alpha``: the alpha-divergence's coefficient.

    Shape: logratios (B,) -> (B,); elementwise, so a ranking's (G, K) -> (G, K) as well.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log sigma(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1); a = 1 is the log
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        wide = torch.promote_types(logratios.dtype, torch.float32)  # at least fp32, where exp(80) is finite
        exponent = torch.clamp(((alpha - 1.0) * logratios).to(wide), max=80.0)
        return (torch.expm1(exponent) / (alpha - 1.0)).to(logratios.dtype)
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


@dataclass(frozen=True)
class Pairs:
    """What the loss types read of B pairs, in the notation above. Shape: each tensor (B,)."""

    policy_chosen_logps: torch.Tensor  # logp_c (avg_c for the length-averaged types)
    policy_rejected_logps: torch.Tensor  # logp_r
    ref_chosen_logps: torch.Tensor | None  # ref_c; None: reference-free
    ref_rejected_logps: torch.Tensor | None  # ref_r
    chosen_logratios: torch.Tensor  # r_c = logp_c - ref_c (logp_c when reference-free)
    rejected_logratios: torch.Tensor  # r_r
    chosen_scores: torch.Tensor  # s_c = f'(r_c)
    rejected_scores: torch.Tensor  # s_r
    h: torch.Tensor  # s_c - s_r, computed once for all the terms of a combination
    chosen_tokens: torch.Tensor | None  # n_c, for the types that need tokens
    rejected_tokens: torch.Tensor | None  # n_r
    sft_chosen_logps: torch.Tensor  # logp_c summed with every token weighted 1 (differs under LD-DPO), for sft


@dataclass(frozen=True)
class LossOptions:
    """The numbers the loss types read besides the log-probs (see :func:`preference_loss`)."""

    beta: float
    label_smoothing: float  # e
    simpo_gamma: float
    discopop_tau: float


def smoothed_logsigmoid_loss(x: torch.Tensor, o: LossOptions) -> torch.Tensor:
    """``-(1 - e) log sigma(beta x) - e log sigma(-beta x)``: the sigmoid loss when the label is flipped with
    probability e. Shape: (B,) -> (B,)."""
    e = o.label_smoothing
    return -(1 - e) * F.logsigmoid(o.beta * x) - e * F.logsigmoid(-o.beta * x)


# The per-pair losses, one per record of dpo_dist.loss_types.LOSSES. Shape: each of Pairs (B,) -> (B,).

def sigmoid_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7, 2305.18290): ``-log sigma(beta h)``; with e, cDPO (Mitchell 2023)."""
    return smoothed_logsigmoid_loss(p.h, o)


def robust_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024, 2403.00409): ``[-(1 - e) log sigma(beta h) + e log sigma(-beta h)] / (1 - 2e)``."""
    e = o.label_smoothing
    return (-(1 - e) * F.logsigmoid(o.beta * p.h) + e * F.logsigmoid(-o.beta * p.h)) / (1 - 2 * e)


def hinge_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, 2305.10425), RSO (2309.06657): ``max(0, 1 - beta h)``."""
    return torch.relu(1 - o.beta * p.h)


def per_token_h(p: Pairs) -> torch.Tensor:
    """``s_c / n_c - s_r / n_r``: the score difference with each side divided by its own response tokens."""
    return p.chosen_scores / p.chosen_tokens.clamp(min=1) - p.rejected_scores / p.rejected_tokens.clamp(min=1)


def ipo_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, 2310.12036) on per-token log-ratios, as the IPO authors advised TRL (the paper's
    results use this form): ``(s_c / n_c - s_r / n_r - 1 / (2 beta))^2``."""
    return (per_token_h(p) - 1 / (2 * o.beta)) ** 2


def ipo_sum_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """IPO's eq. 17 as printed (2310.12036), on summed log-ratios: ``(h - 1 / (2 beta))^2``."""
    return (p.h - 1 / (2 * o.beta)) ** 2


def simpo_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6, 2405.14734), no reference: ``-log sigma(beta (avg_c - avg_r) - gamma)``."""
    return -F.logsigmoid(o.beta * p.h - o.simpo_gamma)


def exo_pair_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16, 2402.00856): ``KL(q || (1 - e, e))``, ``q = (sigma(beta h), sigma(-beta h))``."""
    e = o.label_smoothing
    q_chosen, q_rejected = torch.sigmoid(o.beta * p.h), torch.sigmoid(-o.beta * p.h)
    return (q_chosen * (F.logsigmoid(o.beta * p.h) - math.log1p(-e))
            + q_rejected * (F.logsigmoid(-o.beta * p.h) - math.log(e)))


def nca_pair_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, 2402.05369): ``-log sigma(beta s_c) - 1/2 log sigma(-beta s_c)
    - 1/2 log sigma(-beta s_r)``."""
    return (-F.logsigmoid(o.beta * p.chosen_scores) - 0.5 * F.logsigmoid(-o.beta * p.chosen_scores)
            - 0.5 * F.logsigmoid(-o.beta * p.rejected_scores))


def bco_pair_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """BCO with reward shift 0 (Jung et al. 2024, 2404.04656): ``-log sigma(beta s_c) - log sigma(-beta s_r)``."""
    return -F.logsigmoid(o.beta * p.chosen_scores) - F.logsigmoid(-o.beta * p.rejected_scores)


def sppo_hard_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7 with P = 1 for chosen, 0 for rejected, 2405.00675):
    ``(s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2``."""
    return (p.chosen_scores - 0.5 / o.beta) ** 2 + (p.rejected_scores + 0.5 / o.beta) ** 2


def aot_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, 2406.05882): the smoothed sigmoid loss of
    ``d_i = sort(logp_c - logp_r)_i - sort(ref_c - ref_r)_i``, across the batch."""
    ref_margin = torch.zeros_like(p.h) if p.ref_chosen_logps is None else p.ref_chosen_logps - p.ref_rejected_logps
    delta = torch.sort(p.policy_chosen_logps - p.policy_rejected_logps).values - torch.sort(ref_margin).values
    return smoothed_logsigmoid_loss(delta, o)


def aot_unpaired_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """AOT, unpaired (2406.05882): as :func:`aot_loss` with ``d_i = sort(r_c)_i - sort(r_r)_i``."""
    return smoothed_logsigmoid_loss(torch.sort(p.chosen_logratios).values - torch.sort(p.rejected_logratios).values, o)


def apo_zero_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7, 2408.06266): ``(1 - sigma(beta r_c)) + sigma(beta r_r)``."""
    return (1 - torch.sigmoid(o.beta * p.chosen_logratios)) + torch.sigmoid(o.beta * p.rejected_logratios)


def apo_down_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """APO-down (eq. 8, 2408.06266): ``sigma(beta r_c) + (1 - sigma(beta h))``."""
    return torch.sigmoid(o.beta * p.chosen_logratios) + (1 - torch.sigmoid(o.beta * p.h))


def discopop_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """DiscoPOP / LRML (Lu et al. 2024, eq. 5, 2406.08414): ``(1 - m) (-log sigma(beta h)) + m exp(-beta h)``,
    ``m = sigma(beta h / tau)``."""
    modulation = torch.sigmoid(o.beta * p.h / o.discopop_tau)
    return -F.logsigmoid(o.beta * p.h) * (1 - modulation) + torch.exp(-o.beta * p.h) * modulation


def sft_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """Supervised fine-tuning, as TRL: the NLL per chosen token over the whole batch, ``-sum_i logp_c,i / sum_i n_c,i``
    (a token-weighted mean: a long response counts more), the same number for every pair of the batch. Reads the
    plain summed log-probs (``sft_chosen_logps``) under LD-DPO too."""
    nll = -p.sft_chosen_logps.sum() / p.chosen_tokens.sum().clamp(min=1)
    return nll.expand_as(p.h)


def sigmoid_norm_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """DPO on per-token log-ratios (SimPO's appendix, "DPO w/ LN", 2405.14734): ``-log sigma(beta (s_c / n_c -
    s_r / n_r))``."""
    return -F.logsigmoid(o.beta * per_token_h(p))


def orpo_loss(p: Pairs, o: LossOptions) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 4, 6, 7, 2403.07691), no reference: ``-avg_c - beta log sigma(log odds(avg_c)
    - log odds(avg_r))``, ``log odds(a) = a - log(1 - e^a)``; beta is the paper's lambda."""
    log_odds = (p.policy_chosen_logps - p.policy_rejected_logps) - (
        log1mexp(p.policy_chosen_logps) - log1mexp(p.policy_rejected_logps))
    return -p.policy_chosen_logps - o.beta * F.logsigmoid(log_odds)


# loss type -> its per-pair loss; the keys are LOSSES' pairwise ones (tests/test_loss.py holds them to it).
PER_PAIR: dict[str, Callable[[Pairs, LossOptions], torch.Tensor]] = {
    "sigmoid": sigmoid_loss, "robust": robust_loss, "hinge": hinge_loss, "ipo": ipo_loss, "ipo_sum": ipo_sum_loss,
    "simpo": simpo_loss,
    "exo_pair": exo_pair_loss, "nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
    "aot": aot_loss, "aot_unpaired": aot_unpaired_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss,
    "discopop": discopop_loss, "sft": sft_loss, "sigmoid_norm": sigmoid_norm_loss, "orpo": orpo_loss,
}


def check_arguments(types: Sequence[str], beta: float, f_divergence_type: str) -> None:
    """What either loss function refuses before anything else: an unknown loss type or f-divergence, a beta <= 0."""
    for name in types:
        if name not in LOSSES:
            raise ValueError(f"loss_type {name!r} is not one of {', '.join(LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of {F_DIVERGENCES}")


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
    sft_chosen_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and detached rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: the policy's log-probs of each response, summed over its tokens
            (for ``simpo`` and ``orpo``: averaged over its tokens; their records are ``length_averaged``).
        ref_chosen_logps, ref_rejected_logps: the reference's, the same way; None for reference-free (``simpo``
            and ``orpo`` require None).
        beta: KL strength (for ``simpo``, the reward scale; for ``orpo``, the odds-ratio term's weight lambda).
        loss_type: one of ``dpo_dist.loss_types.LOSSES``, or a sequence of them combined with ``loss_weights``
            (default all 1).
        label_smoothing: e, for the losses that read it: the assumed label-flip probability (``sigmoid``: cDPO,
            ``robust``, ``aot``), EXO's target probability of the rejected side (``exo_pair``, must be above 0).
        simpo_gamma: SimPO's target reward margin gamma.
        discopop_tau: DiscoPOP's temperature tau.
        f_divergence_type, f_alpha_divergence_coef: the f-divergence regularizer (:func:`f_divergence_scores`).
        chosen_tokens, rejected_tokens: response tokens per side, for ``ipo``, ``sft`` and ``sigmoid_norm``.
        pair_weights: a detached weight per pair multiplying its loss (WPO, :func:`wpo_weights`); not with ``aot``
            and ``aot_unpaired``, which sort pairs.

        sft_chosen_logps: the chosen log-probs summed with every token weighted 1, for ``sft`` (default
            ``policy_chosen_logps``; they differ under LD-DPO, whose weighting TRL's sft does not take either).

    Every loss TRL 1.16's DPOTrainer has gives its per-pair losses and rewards on the same log-probs, except where
    docs/losses.md's table says why not: ``sigmoid`` takes ``label_smoothing`` as cDPO (TRL ignores it for sigmoid),
    ``aot`` and ``aot_unpaired`` sort each process's micro-batch (as TRL, per device), and ``sft`` reduces over the
    micro-batch given (as TRL).

    Shape: each input (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    check_arguments(types, beta, f_divergence_type)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    weights = check_loss_options(
        types, loss_weights, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        f_divergence_type=f_divergence_type, with_reference=ref_chosen_logps is not None,
        weighted=pair_weights is not None, wording=ARGUMENT_WORDING, responses="pairs",
    )
    needing = sorted(name for name in types if LOSSES[name].needs_tokens)
    if needing and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"{needing} need chosen_tokens and rejected_tokens")

    ref_free = ref_chosen_logps is None
    chosen_logratios = policy_chosen_logps if ref_free else policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps if ref_free else policy_rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    pairs = Pairs(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=chosen_scores, rejected_scores=rejected_scores, h=chosen_scores - rejected_scores,
        chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        sft_chosen_logps=policy_chosen_logps if sft_chosen_logps is None else sft_chosen_logps,
    )
    options = LossOptions(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)

    total = torch.zeros_like(pairs.h)
    for name, weight in zip(types, weights):
        total = total + weight * PER_PAIR[name](pairs, options)
    if pair_weights is not None:
        total = total * pair_weights.detach()

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return total, chosen_rewards, rejected_rewards


# Rankings: a group of k responses to one prompt, ranked best first (the listwise loss types).

@dataclass(frozen=True)
class Groups:
    """What the listwise loss types read of G groups of up to K responses, each group ranked best first along K. Shape:
    each tensor (G, K); at padding (``mask`` False) every tensor but ``mask`` holds 0, whatever the input held there."""

    mask: torch.Tensor  # bool: the response exists (a group of k < K responses is padded)
    logratios: torch.Tensor  # r = policy_logps - ref_logps (policy_logps when reference-free)
    scores: torch.Tensor  # s = f'(r)


@dataclass(frozen=True)
class RankingOptions:
    """The numbers the listwise loss types read besides the log-probs (see :func:`ranking_loss`)."""

    beta: float
    top_m: int | None  # m: score the choice of the first m positions only; None: all


def plackett_luce_loss(g: Groups, o: RankingOptions) -> torch.Tensor:
    """The negative log-likelihood of each group's ranking under the Plackett-Luce model with rewards ``beta s`` (the
    DPO paper's ranking objective, Rafailov et al. 2023, app. A.3, 2305.18290): the best response is chosen from all k
    with probability softmax(beta s) at it, the second from the k - 1 left, and so on, so
    ``-sum_{j=1..m} [beta s_j - log sum_{l=j..k} exp(beta s_l)]``, positions j counted among the group's responses.

    At s = 0 (policy = reference) the j-th choice is one of k - j + 1 equally likely: the loss is
    ``sum_{j=1..m} ln(k - j + 1)``, ln(k!) for the whole ranking; with k = 2 it is the sigmoid loss of the pair
    ``-log sigma(beta (s_1 - s_2))``. Adding one constant to a group's scores changes nothing: f-DPO's beta log Z(x),
    one per prompt, cancels (``LossType.f_divergence``). A group of one response has loss 0.

    Shape: each of Groups (G, K) -> (G,).
    """
    x = o.beta * g.scores
    k_max = x.shape[1]
    later = torch.ones(k_max, k_max, dtype=torch.bool, device=x.device).triu()  # [j, l]: l is ranked at j or below
    # [g, j, l]: response l is still to be placed when position j is chosen. A padding row j would be empty (all -inf,
    # whose logsumexp has a NaN gradient); it reads every score instead, and its term is dropped below.
    left = (later & g.mask[:, None, :]) | ~g.mask[:, :, None]
    normalizer = torch.logsumexp(x[:, None, :].masked_fill(~left, float("-inf")), dim=-1)  # (G, K)
    scored = g.mask if o.top_m is None else g.mask & (g.mask.cumsum(dim=1) <= o.top_m)
    return -torch.where(scored, x - normalizer, torch.zeros_like(x)).sum(dim=1)


# loss type -> its per-group loss; the keys are LOSSES' listwise ones (tests/test_loss.py holds them to it).
PER_GROUP: dict[str, Callable[[Groups, RankingOptions], torch.Tensor]] = {"plackett_luce": plackett_luce_loss}


def ranking_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    loss_type: str = "plackett_luce",
    ranking_top_m: int | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranking losses and detached rewards: the listwise counterpart of :func:`preference_loss`.

    Args:
        policy_logps: the policy's log-prob of each response, summed over its tokens; each row one prompt's responses
            in their labelled order, best first.
        ref_logps: the reference's, the same way; None for reference-free (the reference log-probs are taken as 0).
        mask: True where a response exists; a group of k < K responses is padded (at any positions: the order is that
            of its responses along K). Padding values are never read, NaN included, and get no gradient. None: all.
        beta: KL strength.
        loss_type: one of the listwise types of ``dpo_dist.loss_types.LOSSES``.
        ranking_top_m: m, score the choice of each group's first m positions only (positions past a group's k - 1
            add 0); None: all.
        f_divergence_type, f_alpha_divergence_coef: the f-divergence regularizer (:func:`f_divergence_scores`).

    The caller averages the per-group losses over the groups of its batch, as ``pair_losses`` does over pairs
    (``losses.mean()``): each group counts once, whatever its k.

    Shape: policy_logps, ref_logps, mask (G, K) -> (losses (G,), rewards (G, K)); rewards ``beta * (policy_logps -
    ref_logps)``, detached, 0 at padding.
    """
    check_arguments((loss_type,), beta, f_divergence_type)
    # label_smoothing 0 and a discopop_tau no listwise type reads: the options a ranking does not take.
    check_loss_options((loss_type,), None, label_smoothing=0.0, discopop_tau=1.0, f_divergence_type=f_divergence_type,
                       with_reference=ref_logps is not None, weighted=False, wording=ARGUMENT_WORDING,
                       responses="ranking", ranking_top_m=ranking_top_m)
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be (groups, responses), got shape {tuple(policy_logps.shape)}")
    mask = torch.ones_like(policy_logps, dtype=torch.bool) if mask is None else mask
    for name, tensor in (("ref_logps", ref_logps), ("mask", mask)):
        if tensor is not None and tensor.shape != policy_logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, policy_logps {tuple(policy_logps.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")

    logratios = policy_logps if ref_logps is None else policy_logps - ref_logps
    # where, not a product: padding may hold NaN or inf, and 0 * NaN is NaN in the value and in the gradient.
    logratios = torch.where(mask, logratios, torch.zeros_like(logratios))
    scores = torch.where(mask, f_divergence_scores(logratios, f_divergence_type, f_alpha_divergence_coef),
                         torch.zeros_like(logratios))
    groups = Groups(mask=mask, logratios=logratios, scores=scores)
    losses = PER_GROUP[loss_type](groups, RankingOptions(beta=beta, top_m=ranking_top_m))
    return losses, beta * logratios.detach()
