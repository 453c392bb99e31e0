"""The loss types: one record each, the one place that says what a loss type takes and which options and other loss
types go with it. Their math is :mod:`dpo_dist.train.loss`, one function per record: per pair (``PER_PAIR``, by name)
for the pairwise types, per ranked group of k responses (``PER_GROUP``) for the listwise ones.

The records sit at the top of the layering beside the config, not in the train stage, because the config checks a
run's loss settings before anything is loaded, and neither the config nor ``launch/*.py --help`` may import a stage
or torch (tests/test_layout.py, tests/test_package.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal



@dataclass(frozen=True)
class LossType:
    """A loss type: what it takes, and which options and other loss types go with it. The config's checks and
    ``preference_loss``'s (both :func:`check_loss_options`), the loss's dispatch and the objective read these fields;
    tests/test_loss.py holds the tables of docs/losses.md and dpo_dist/train/loss.py to the registry's names."""

    name: str
    # Takes each response's log-prob averaged over its tokens, where the others take sums.
    length_averaged: bool = False
    # Never uses a reference model (reference.mode=none), so no option that acts on log-ratios to one applies.
    reference_free: bool = False
    # How it reads loss.label_smoothing e: not at all, optionally (0 is off), or only above 0.
    label_smoothing: Literal["unused", "optional", "required"] = "unused"
    # Sorts log-ratios across the batch: a pair's loss depends on the other pairs of its batch.
    sorts_batch: bool = False
    # Reads the response token counts.
    needs_tokens: bool = False
    # How it takes loss.f_divergence_type (f-DPO, Wang et al. 2023, 2309.16240): "applies" where the loss reads the
    # scores only through their difference s_c - s_r (or each side's per-token score), where the reparameterization's
    # beta log Z(x) cancels; "undefined" where it reads a side alone or sorts log-ratios, so no f-divergence
    # generalization exists (TRL 1.16 refuses the same set); "unused" where it reads no log-ratio at all (sft).
    # A listwise loss that reads a prompt's scores only through softmaxes over them (plackett_luce) applies too: the
    # beta log Z(x) is one constant per prompt, and a softmax over that prompt's responses does not see it.
    f_divergence: Literal["applies", "undefined", "unused"] = "applies"
    # Scores a whole ranking of k responses per prompt ((G, K) groups, best first), not chosen/rejected pairs: it takes
    # data.responses=ranking, where every pairwise type is refused, and one loss per group.
    listwise: bool = False

    @property
    def combines(self) -> bool:
        """Whether it may be one term of a weighted combination (loss.loss_weights): the terms share one set of
        log-probs, and a length-averaged loss takes averages where the others take sums."""
        return not self.length_averaged


# name -> record, in the order the docs list them.
LOSSES: dict[str, LossType] = {t.name: t for t in (
    LossType("sigmoid", label_smoothing="optional"),  # with e: cDPO
    LossType("robust", label_smoothing="optional"),
    LossType("hinge"),
    LossType("ipo", needs_tokens=True),  # per-token log-ratios, as TRL and the IPO authors' later advice
    LossType("ipo_sum"),  # the IPO paper's eq. 17 as printed, on summed log-ratios
    LossType("simpo", length_averaged=True, reference_free=True, f_divergence="undefined"),
    LossType("exo_pair", label_smoothing="required"),  # its target gives the rejected side probability e; takes log e
    LossType("nca_pair", f_divergence="undefined"),
    LossType("bco_pair", f_divergence="undefined"),
    LossType("sppo_hard", f_divergence="undefined"),
    LossType("aot", label_smoothing="optional", sorts_batch=True, f_divergence="undefined"),
    LossType("aot_unpaired", label_smoothing="optional", sorts_batch=True, f_divergence="undefined"),
    LossType("apo_zero", f_divergence="undefined"),
    LossType("apo_down", f_divergence="undefined"),
    LossType("discopop"),
    LossType("sft", needs_tokens=True, f_divergence="unused"),  # one token-weighted mean per micro-batch, as TRL
    LossType("sigmoid_norm", needs_tokens=True),
    LossType("orpo", length_averaged=True, reference_free=True, f_divergence="undefined"),
    LossType("plackett_luce", listwise=True),  # the DPO paper's ranking loss (Rafailov et al. 2023, app. A.3)
)}
# The f-divergence regularizers (dpo_dist.train.loss.f_divergence_scores); reverse_kl, the first, is plain DPO's.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossWording:
    """How one caller's messages name what :func:`check_loss_options` refuses: the config's keys (``CONFIG_WORDING``)
    or the arguments of ``dpo_dist.train.loss.preference_loss``. The rules are the same; the user reads their own
    terms."""

    option: str  # an option's name from its bare name {}: "loss.{}" for a config key
    loss_types: str  # the loss types given, from their count {n} and list {types}
    no_reference: str  # what to do to run a reference-free loss
    weighting: str  # what WPO's per-pair weighting is called
    ranking: str  # what a listwise loss needs: ranked groups of responses
    pairs: str  # what a pairwise loss needs: chosen/rejected pairs


CONFIG_WORDING = LossWording(option="loss.{}", loss_types="the {n} loss types in loss.loss_type ({types})",
                             no_reference="set reference.mode=none", weighting="loss.use_weighting (WPO)",
                             ranking="data.responses=ranking", pairs="data.responses=pairs")
# The responses a run's data gives, per prompt: a chosen/rejected pair, or a ranking of k responses (best first).
RESPONSES = ("pairs", "ranking")


def check_loss_options(types: tuple[str, ...], loss_weights: list[float] | tuple[float, ...] | None, *,
                       label_smoothing: float, discopop_tau: float, f_divergence_type: str, with_reference: bool,
                       weighted: bool, wording: LossWording, responses: str, ld_alpha: float | None = None,
                       ranking_top_m: int | None = None, rpo_alpha: float = 0.0) -> tuple[float, ...]:
    """Which loss types, weights and options go together, from the records: stated once, for the config, for
    ``preference_loss`` and for ``ranking_loss``. ``types``: names in :data:`LOSSES`; ``with_reference``: reference
    log-probs are given; ``weighted``: WPO's per-pair weights; ``responses``: what the data gives per prompt, one of
    :data:`RESPONSES`. Returns the weights (1 each when None); a ValueError otherwise."""
    key = wording.option.format
    records = [LOSSES[name] for name in types]
    if not types:
        raise ValueError(f"{key('loss_type')} is an empty list; give one or more of {', '.join(LOSSES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"{key('loss_type')} names a loss twice ({list(types)}); give it one weight in "
                         f"{key('loss_weights')}")
    weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"{key('loss_weights')} has {len(weights)} weights for "
                         f"{wording.loss_types.format(n=len(types), types=list(types))}: give one weight per loss type")
    if any(w < 0 for w in weights):
        raise ValueError(f"{key('loss_weights')} must not be negative, got {list(weights)}")
    listwise = [t.name for t in records if t.listwise]
    pairwise = [t.name for t in records if not t.listwise]
    ranking_types = ", ".join(name for name, t in LOSSES.items() if t.listwise)
    if listwise and pairwise:
        raise ValueError(f"{key('loss_type')} mixes listwise {listwise[0]} with pairwise {', '.join(pairwise)}: a "
                         "listwise loss has one term per ranked group of k responses, a pairwise loss one per "
                         "chosen/rejected pair, so their terms belong to different examples and cannot be added; "
                         "train with one kind")
    if responses not in RESPONSES:
        raise ValueError(f"responses {responses!r} is not one of {', '.join(RESPONSES)}")
    if listwise and responses != "ranking":
        raise ValueError(f"{key('loss_type')}={listwise[0]} is listwise (it scores a whole ranking of k responses per "
                         f"prompt): it needs {wording.ranking}")
    if pairwise and responses != "pairs":
        raise ValueError(f"{key('loss_type')}={pairwise[0]} is pairwise (one term per chosen/rejected pair): it needs "
                         f"{wording.pairs}; a ranking of k responses takes {ranking_types}")
    if ranking_top_m is not None and not listwise:
        raise ValueError(f"{key('ranking_top_m')} truncates a ranking loss to its top positions; it applies to "
                         f"{ranking_types}, not {', '.join(types)}")
    if ranking_top_m is not None and ranking_top_m < 1:
        raise ValueError(f"{key('ranking_top_m')} is how many of a ranking's first positions are scored: 1 or more "
                         f"(null: all), got {ranking_top_m}")
    # The options below are defined on a pair (its label, its two lengths, its two responses' probabilities, its
    # chosen response); a ranking of k responses has no one pair to take them from.
    if listwise and ld_alpha is not None:
        raise ValueError(f"{key('ld_alpha')} (LD-DPO) weights a pair's longer response beyond the shorter one's "
                         f"length; {listwise[0]} ranks k responses, with no one pair to measure")
    if listwise and weighted:
        raise ValueError(f"{wording.weighting} weights a pair by its two responses' probabilities (w_c w_r); it is "
                         f"not defined for {listwise[0]}'s groups of k responses")
    if listwise and rpo_alpha:
        raise ValueError(f"{key('rpo_alpha')} (RPO) adds an NLL on a pair's chosen response; it is not defined for "
                         f"{listwise[0]}'s rankings")
    alone = [t for t in records if not t.combines]
    if alone and len(types) > 1:
        raise ValueError(f"{key('loss_type')}: {alone[0].name} takes length-averaged log-probs"
                         f"{' and no reference' if alone[0].reference_free else ''}; it cannot be combined with other "
                         "loss types")
    free = [t.name for t in records if t.reference_free]
    if free and with_reference:
        raise ValueError(f"{key('loss_type')}={free[0]} is reference-free: {wording.no_reference}")
    if free and f_divergence_type != F_DIVERGENCES[0]:
        raise ValueError(f"{key('f_divergence_type')} regularizes the log-ratio to a reference; {free[0]} has none")
    if f_divergence_type != F_DIVERGENCES[0]:
        undefined = [t.name for t in records if t.f_divergence == "undefined"]
        applies = [name for name, t in LOSSES.items() if t.f_divergence == "applies"]
        if undefined:
            raise ValueError(
                f"{key('f_divergence_type')}={f_divergence_type} is not defined for {', '.join(undefined)}: f-DPO's "
                "reparameterization leaves a beta log Z(x) term that cancels only where a loss reads a prompt's "
                f"scores through their differences ({', '.join(applies)}); use {F_DIVERGENCES[0]} with "
                f"{', '.join(undefined)}")
        if not any(t.f_divergence == "applies" for t in records):
            raise ValueError(f"{key('f_divergence_type')}={f_divergence_type} would be ignored: "
                             f"{', '.join(types)} reads no log-ratio to the reference")
    averaged = [t.name for t in records if t.length_averaged]
    if averaged and ld_alpha is not None:
        raise ValueError(f"{key('ld_alpha')} reweights summed log-probs; {averaged[0]} averages them over tokens")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{key('label_smoothing')} must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and listwise:
        raise ValueError(f"{key('label_smoothing')} is not defined for {listwise[0]}: it is the probability that a "
                         "pair's label is flipped (cDPO), and a ranking of k responses has k! - 1 other orders, with "
                         "no one noise model among them")
    smoothed = [name for name, t in LOSSES.items() if t.label_smoothing != "unused"]
    if label_smoothing and not set(types) & set(smoothed):
        raise ValueError(f"{key('label_smoothing')} applies to {', '.join(smoothed)}, not {', '.join(types)}")
    for t in records:  # exo_pair, so far the only one, hence its paper's advice
        if t.label_smoothing == "required" and label_smoothing <= 0:
            raise ValueError(f"{key('loss_type')} {t.name} needs {key('label_smoothing')} above 0 (its epsilon: the "
                             "target distribution is (1 - e, e) and it takes log e; EXO suggests 0.001)")
    if discopop_tau <= 0:
        raise ValueError(f"{key('discopop_tau')} must be positive, got {discopop_tau}")
    sorting = [name for name, t in LOSSES.items() if t.sorts_batch]
    if weighted and set(types) & set(sorting):
        raise ValueError(f"{wording.weighting} is not defined for {' and '.join(sorting)}: they sort pairs within the "
                         "batch, so a pair's loss term is not its own to weight")
    return weights
