"""Preference losses against hand-computed values (the arithmetic is in each docstring)."""

import math
import pathlib
import re

import pytest
import torch

from dpo_dist.config import ConfigError, load_config
from dpo_dist.loss_types import LOSSES
from dpo_dist.train import loss as loss_module
from dpo_dist.train.loss import (
    PER_GROUP,
    PER_PAIR,
    length_desensitized_logps,
    log1mexp,
    preference_loss,
    wpo_weights,
)

LN2 = math.log(2)


def logps(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type, smoothing, beta, expected",
    [
        ("sigmoid", 0.0, 0.1, LN2),  # -log sigma(0) = ln 2
        ("sigmoid", 0.2, 0.1, LN2),  # cDPO: -(0.8 + 0.2) log sigma(0) = ln 2
        ("robust", 0.2, 0.1, LN2),  # (0.8 ln 2 - 0.2 ln 2) / (1 - 0.4) = ln 2
        ("hinge", 0.0, 0.1, 1.0),  # max(0, 1 - 0) = 1
        ("ipo", 0.0, 0.1, 25.0),  # (0 - 1 / 0.2)^2 = 25 = (1 / (2 beta))^2
        ("ipo", 0.0, 0.5, 1.0),  # (1 / (2 * 0.5))^2 = 1
        ("ipo_sum", 0.0, 0.1, 25.0),
    ],
)
def test_policy_equal_to_reference(loss_type, smoothing, beta, expected):
    """Policy = reference: every log-ratio is 0, rewards are 0."""
    policy = logps(-12.0, -3.5)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy, policy - 1.0, policy.clone(), policy - 1.0, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
        chosen_tokens=torch.tensor([5, 2]), rejected_tokens=torch.tensor([3, 4]),
    )
    torch.testing.assert_close(losses, torch.full((2,), expected, dtype=torch.float64))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_hand_values_off_zero():
    """policy_chosen -10, ref_chosen -12, policy_rejected -9, ref_rejected -8, beta 0.5:
    chosen log-ratio +2, rejected -1, h = 3, beta h = 1.5.
    sigmoid: -log sigma(1.5) = log(1 + e^-1.5) = 0.2014133
    cDPO e=0.1: 0.9 * 0.2014133 + 0.1 * log(1 + e^1.5) = 0.9 * 0.2014133 + 0.1 * 1.7014133 = 0.3514133
    robust e=0.1: (0.9 * 0.2014133 - 0.1 * 1.7014133) / 0.8 = 0.0139133
    hinge: max(0, 1 - 1.5) = 0;  ipo_sum: (3 - 1)^2 = 4
    rewards: chosen 0.5 * 2 = 1.0, rejected 0.5 * -1 = -0.5."""
    args = (logps(-10.0), logps(-9.0), logps(-12.0), logps(-8.0))
    expected = {"sigmoid": 0.2014133, "hinge": 0.0, "ipo_sum": 4.0}
    for loss_type, value in expected.items():
        losses, chosen, rejected = preference_loss(*args, beta=0.5, loss_type=loss_type)
        assert losses.item() == pytest.approx(value, abs=1e-6), loss_type
        assert chosen.item() == 1.0 and rejected.item() == -0.5
    assert preference_loss(*args, beta=0.5, label_smoothing=0.1)[0].item() == pytest.approx(0.3514133, abs=1e-6)
    robust = preference_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1)[0].item()
    assert robust == pytest.approx(0.0139133, abs=1e-6)


def test_simpo_is_reference_free_and_length_averaged():
    """avg_chosen -1.0, avg_rejected -1.5, beta 2, gamma 0.5: -log sigma(2 * 0.5 - 0.5) = log(1 + e^-0.5) = 0.4740770.
    Equal averages: -log sigma(-gamma) = log(1 + e^0.5) = 0.9740770. Rewards: beta * avg = -2.0, -3.0."""
    losses, chosen, rejected = preference_loss(
        logps(-1.0, -2.0), logps(-1.5, -2.0), None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5
    )
    torch.testing.assert_close(losses, logps(0.4740770, 0.9740770), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, logps(-2.0, -4.0))
    torch.testing.assert_close(rejected, logps(-3.0, -4.0))
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss(logps(-1.0), logps(-1.0), logps(0.0), logps(0.0), beta=2.0, loss_type="simpo")


def test_reference_free_sigmoid_takes_reference_as_zero():
    with_zero = preference_loss(logps(-3.0), logps(-4.0), logps(0.0), logps(0.0), beta=0.1)
    without = preference_loss(logps(-3.0), logps(-4.0), None, None, beta=0.1)
    for a, b in zip(with_zero, without):
        torch.testing.assert_close(a, b)


def test_sigmoid_gradient_at_zero_is_minus_beta_over_two():
    """d/dh [-log sigma(beta h)] = -beta sigma(-beta h) = -beta / 2 at h = 0; h moves one-for-one with the policy's
    chosen log-prob and against its rejected one."""
    beta = 0.3
    chosen = logps(-5.0).requires_grad_()
    rejected = logps(-6.0).requires_grad_()
    losses, _, _ = preference_loss(chosen, rejected, logps(-5.0), logps(-6.0), beta=beta)
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-beta / 2)
    assert rejected.grad.item() == pytest.approx(beta / 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo_sum"])
def test_swapping_chosen_and_rejected(loss_type):
    """Swapping sides negates h and swaps the rewards. sigmoid: loss(h) - loss(-h) = -beta h (log sigma(x) -
    log sigma(-x) = x); ipo_sum: (h - c)^2 vs (h + c)^2."""
    beta, pc, pr, rc, rr = 0.5, logps(-10.0), logps(-9.0), logps(-12.0), logps(-8.0)
    forward = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    swapped = preference_loss(pr, pc, rr, rc, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(forward[1], swapped[2])
    torch.testing.assert_close(forward[2], swapped[1])
    h = 3.0
    if loss_type == "sigmoid":
        assert (forward[0] - swapped[0]).item() == pytest.approx(-beta * h)
    if loss_type == "ipo_sum":
        assert swapped[0].item() == pytest.approx((-h - 1) ** 2)
    assert swapped[0].item() > forward[0].item()


def test_rewards_are_detached_and_losses_per_example():
    policy_chosen = logps(-1.0, -2.0, -3.0).requires_grad_()
    losses, chosen, rejected = preference_loss(policy_chosen, logps(-2.0, -2.0, -2.0), None, None, beta=0.1)
    assert losses.shape == (3,) and losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="dpo"), "loss_type 'dpo' is not one of"),
        (dict(beta=0.0), "beta must be positive"),
        (dict(label_smoothing=0.5), "label_smoothing must be in"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies to"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        preference_loss(logps(-1.0), logps(-2.0), logps(-1.0), logps(-2.0), **kwargs)



# ---- TRL's other loss types, ORPO, and the modifiers, against the papers' formulas computed here by hand ----
# One pair throughout: policy_chosen -10, ref_chosen -10.5 (r_c = +0.5); policy_rejected -8, ref_rejected -7.7
# (r_r = -0.3); h = r_c - r_r = 0.8; beta 0.1, so beta r_c = 0.05, beta r_r = -0.03, beta h = 0.08.
PAIR = (logps(-10.0), logps(-8.0), logps(-10.5), logps(-7.7))


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


def one(loss_type, *, args=PAIR, beta=0.1, **kwargs):
    losses, chosen, rejected = preference_loss(*args, beta=beta, loss_type=loss_type, **kwargs)
    return losses.item(), chosen.item(), rejected.item()


HAND = {
    # EXO (eq. 16), e = 0.001: q = (sigma(beta h), sigma(-beta h)), KL(q || (1 - e, e))
    "exo_pair": (dict(label_smoothing=0.001),
                 sig(0.08) * (math.log(sig(0.08)) - math.log(0.999)) + sig(-0.08) * (math.log(sig(-0.08)) - math.log(0.001))),
    # NCA, pairwise: -log sig(beta r_c) - 1/2 log sig(-beta r_c) - 1/2 log sig(-beta r_r)
    "nca_pair": ({}, -logsig(0.05) - 0.5 * logsig(-0.05) - 0.5 * logsig(0.03)),
    # BCO, pairwise: -log sig(beta r_c) - log sig(-beta r_r)
    "bco_pair": ({}, -logsig(0.05) - logsig(0.03)),
    # SPPO hard: (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2 = (0.5 - 5)^2 + (-0.3 + 5)^2 = 20.25 + 22.09
    "sppo_hard": ({}, 42.34),
    # APO-zero: 1 - sig(beta r_c) + sig(beta r_r)
    "apo_zero": ({}, 1 - sig(0.05) + sig(-0.03)),
    # APO-down: sig(beta r_c) + 1 - sig(beta h)
    "apo_down": ({}, sig(0.05) + 1 - sig(0.08)),
    # DiscoPOP, tau 0.05: m = sig(0.08 / 0.05); (1 - m)(-log sig(0.08)) + m exp(-0.08)
    "discopop": ({}, (1 - sig(1.6)) * -logsig(0.08) + sig(1.6) * math.exp(-0.08)),
    # SFT: -logp_c / n_c = 10 / 4
    "sft": (dict(chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2])), 2.5),
    # sigmoid_norm: -log sig(beta (r_c / n_c - r_r / n_r)) = -log sig(0.1 (0.5 / 4 + 0.3 / 2))
    "sigmoid_norm": (dict(chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2])), -logsig(0.0275)),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_trl_losses_hand_values(loss_type):
    kwargs, expected = HAND[loss_type]
    loss, chosen, rejected = one(loss_type, **kwargs)
    assert loss == pytest.approx(expected, abs=1e-9)
    assert chosen == pytest.approx(0.05) and rejected == pytest.approx(-0.03)  # beta x log-ratio, whatever the loss


# ---- Every loss type on one batch of three pairs, per pair, from each paper's formula written here with math ----
# policy_chosen [-10, -4, -7], ref_chosen [-10.5, -3, -7.2]: r_c = [0.5, -1, 0.2]
# policy_rejected [-8, -5, -9.5], ref_rejected [-7.7, -5.5, -9]: r_r = [-0.3, 0.5, -0.5]; h = [0.8, -1.5, 0.7]
# response tokens n_c = [4, 2, 5], n_r = [2, 3, 6]; beta 0.2; e = 0.1 where a loss takes it (0.001 for exo_pair)
THREE = dict(pc=[-10.0, -4.0, -7.0], pr=[-8.0, -5.0, -9.5], rc=[-10.5, -3.0, -7.2], rr=[-7.7, -5.5, -9.0],
             nc=[4, 2, 5], nr=[2, 3, 6])
B3 = 0.2


def three_hand(name):
    """(options, per-pair losses) for one loss type on THREE."""
    t = THREE
    rc = [p - r for p, r in zip(t["pc"], t["rc"])]
    rr = [p - r for p, r in zip(t["pr"], t["rr"])]
    h = [c - r for c, r in zip(rc, rr)]
    pt = [c / n - r / m for c, r, n, m in zip(rc, rr, t["nc"], t["nr"])]  # per-token log-ratio difference
    e = 0.1
    if name == "sigmoid":  # cDPO with e
        return dict(label_smoothing=e), [-(1 - e) * logsig(B3 * x) - e * logsig(-B3 * x) for x in h]
    if name == "robust":
        return dict(label_smoothing=e), [(-(1 - e) * logsig(B3 * x) + e * logsig(-B3 * x)) / (1 - 2 * e) for x in h]
    if name == "hinge":
        return {}, [max(0.0, 1 - B3 * x) for x in h]
    if name == "ipo":
        return {}, [(x - 1 / (2 * B3)) ** 2 for x in pt]
    if name == "ipo_sum":
        return {}, [(x - 1 / (2 * B3)) ** 2 for x in h]
    if name == "exo_pair":
        e = 0.001
        return dict(label_smoothing=e), [sig(B3 * x) * (math.log(sig(B3 * x)) - math.log(1 - e))
                                         + sig(-B3 * x) * (math.log(sig(-B3 * x)) - math.log(e)) for x in h]
    if name == "nca_pair":
        return {}, [-logsig(B3 * c) - 0.5 * logsig(-B3 * c) - 0.5 * logsig(-B3 * r) for c, r in zip(rc, rr)]
    if name == "bco_pair":
        return {}, [-logsig(B3 * c) - logsig(-B3 * r) for c, r in zip(rc, rr)]
    if name == "sppo_hard":
        return {}, [(c - 1 / (2 * B3)) ** 2 + (r + 1 / (2 * B3)) ** 2 for c, r in zip(rc, rr)]
    if name == "aot":  # d_i = sort(logp_c - logp_r)_i - sort(ref_c - ref_r)_i
        margins = sorted(c - r for c, r in zip(t["pc"], t["pr"]))  # [-2, 1, 2.5]
        ref_margins = sorted(c - r for c, r in zip(t["rc"], t["rr"]))  # [-2.8, 1.8, 2.5]
        return dict(label_smoothing=e), [-(1 - e) * logsig(B3 * (m - f)) - e * logsig(-B3 * (m - f))
                                         for m, f in zip(margins, ref_margins)]
    if name == "aot_unpaired":
        return dict(label_smoothing=e), [-(1 - e) * logsig(B3 * (c - r)) - e * logsig(-B3 * (c - r))
                                         for c, r in zip(sorted(rc), sorted(rr))]
    if name == "apo_zero":
        return {}, [1 - sig(B3 * c) + sig(B3 * r) for c, r in zip(rc, rr)]
    if name == "apo_down":
        return {}, [sig(B3 * c) + 1 - sig(B3 * x) for c, x in zip(rc, h)]
    if name == "discopop":
        tau = 0.05
        return {}, [(1 - sig(B3 * x / tau)) * -logsig(B3 * x) + sig(B3 * x / tau) * math.exp(-B3 * x) for x in h]
    if name == "sft":  # one token-weighted mean over the batch: (10 + 4 + 7) / (4 + 2 + 5)
        return {}, [21 / 11] * 3
    if name == "sigmoid_norm":
        return {}, [-logsig(B3 * x) for x in pt]
    raise KeyError(name)


THREE_FREE = {  # the reference-free, length-averaged ones take per-token averages and no reference
    # simpo, gamma 0.5: -log sig(beta (avg_c - avg_r) - gamma)
    "simpo": lambda ac, ar: -logsig(B3 * (ac - ar) - 0.5),
    # orpo: -avg_c - beta log sig(log odds(avg_c) - log odds(avg_r)), log odds(a) = a - log(1 - e^a)
    "orpo": lambda ac, ar: -ac - B3 * logsig((ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))),
}


@pytest.mark.parametrize("loss_type", [name for name, t in LOSSES.items() if not t.listwise])
def test_every_loss_type_by_hand_on_a_batch(loss_type):
    """Each pairwise loss type's per-pair losses and rewards on THREE against its formula computed here with math, one
    pair at a time (aot sorts and sft reduces across the batch, as written above). The listwise ones:
    tests/test_ranking_loss.py."""
    t = THREE
    tokens = dict(chosen_tokens=torch.tensor(t["nc"]), rejected_tokens=torch.tensor(t["nr"]))
    if LOSSES[loss_type].reference_free:
        ac = [p / n for p, n in zip(t["pc"], t["nc"])]
        ar = [p / n for p, n in zip(t["pr"], t["nr"])]
        losses, chosen, rejected = preference_loss(logps(*ac), logps(*ar), None, None, beta=B3, loss_type=loss_type)
        hand = [THREE_FREE[loss_type](c, r) for c, r in zip(ac, ar)]
        want_chosen, want_rejected = [B3 * c for c in ac], [B3 * r for r in ar]
    else:
        options, hand = three_hand(loss_type)
        losses, chosen, rejected = preference_loss(logps(*t["pc"]), logps(*t["pr"]), logps(*t["rc"]), logps(*t["rr"]),
                                                   beta=B3, loss_type=loss_type, **tokens, **options)
        want_chosen = [B3 * (p - r) for p, r in zip(t["pc"], t["rc"])]
        want_rejected = [B3 * (p - r) for p, r in zip(t["pr"], t["rr"])]
    torch.testing.assert_close(losses, logps(*hand), atol=1e-12, rtol=0)
    torch.testing.assert_close(chosen, logps(*want_chosen), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, logps(*want_rejected), atol=1e-12, rtol=0)


def test_sft_reads_the_plain_log_probs():
    """Under LD-DPO the preference terms take reweighted log-probs; sft, as TRL's, the plain sums it is given."""
    t = THREE
    tokens = dict(chosen_tokens=torch.tensor(t["nc"]), rejected_tokens=torch.tensor(t["nr"]))
    reweighted = logps(*t["pc"]) * 0.5
    losses = preference_loss(reweighted, logps(*t["pr"]), logps(*t["rc"]), logps(*t["rr"]), beta=B3,
                             loss_type=["sigmoid", "sft"], sft_chosen_logps=logps(*t["pc"]), **tokens)[0]
    sigmoid = preference_loss(reweighted, logps(*t["pr"]), logps(*t["rc"]), logps(*t["rr"]), beta=B3)[0]
    torch.testing.assert_close(losses - sigmoid, logps(21 / 11, 21 / 11, 21 / 11), atol=1e-12, rtol=0)


# policy moves chosen up and rejected down (d loss / d policy_chosen < 0 < d loss / d policy_rejected) at policy =
# reference, where every log-ratio is 0. apo_down: d/d r_c [sig(beta r_c) - sig(beta h)] = beta/4 - beta/4 = 0, the
# anchor that holds the chosen side while it pushes the rejected one down; sft does not see the rejected side.
# discopop is not monotone near h = 0 at the paper's tau 0.05: with x = beta h and m = sig(x / tau),
# dL/dx = m'(x) (exp(-x) + log sig(x)) - (1 - m) sig(-x) - m exp(-x) = (1 / (4 tau)) (1 - ln 2) - 1/4 - 1/2 = +0.784
# at 0, so its first step at policy = reference pushes h down.
GRADIENT_SIGNS = {name: (-1, 1) for name in ("sigmoid", "robust", "hinge", "ipo", "ipo_sum", "exo_pair", "nca_pair",
                                             "bco_pair", "sppo_hard", "apo_zero", "sigmoid_norm")}
GRADIENT_SIGNS.update(apo_down=(0, 1), sft=(-1, 0), discopop=(1, -1))


@pytest.mark.parametrize("loss_type", sorted(GRADIENT_SIGNS))
def test_gradient_signs_at_the_reference(loss_type):
    chosen = logps(-5.0).requires_grad_()
    rejected = logps(-6.0).requires_grad_()
    kwargs = dict(label_smoothing=0.001) if loss_type == "exo_pair" else {}
    losses, _, _ = preference_loss(chosen, rejected, logps(-5.0), logps(-6.0), beta=0.1, loss_type=loss_type,
                                   chosen_tokens=torch.tensor([3]), rejected_tokens=torch.tensor([3]), **kwargs)
    losses.sum().backward()
    want_chosen, want_rejected = GRADIENT_SIGNS[loss_type]
    assert torch.sign(chosen.grad).item() == want_chosen, chosen.grad
    rejected_grad = rejected.grad if rejected.grad is not None else logps(0.0)  # sft: no path to the rejected side
    assert torch.sign(rejected_grad).item() == want_rejected, rejected_grad
    if loss_type == "apo_down":
        assert chosen.grad.item() == pytest.approx(0.0, abs=1e-12)
        assert rejected.grad.item() == pytest.approx(0.1 / 4)  # -d/d r_r of -sig(beta h) = beta sig'(0)
    if loss_type == "discopop":
        assert chosen.grad.item() == pytest.approx(0.1 * ((1 / (4 * 0.05)) * (1 - LN2) - 0.75), abs=1e-12)


# Two pairs whose order matters: policy chosen [-10, -4], rejected [-8, -5]; reference chosen [-3, -4], rejected
# [-10, -1.5]. Log-ratios r_c = [-7, 0], r_r = [2, -3.5]; paired h = [-9, 3.5].
BATCH = (logps(-10.0, -4.0), logps(-8.0, -5.0), logps(-3.0, -4.0), logps(-10.0, -1.5))


def test_aot_sorts_within_the_batch():
    """aot: policy margins logp_c - logp_r = [-2, 1] (sorted [-2, 1]), reference margins [7, -2.5] (sorted [-2.5, 7]):
    d = [0.5, -6]. aot_unpaired: sort(r_c) = [-7, 0], sort(r_r) = [-3.5, 2]: d = [-3.5, -2] (paired h would be
    [-9, 3.5]). Loss per quantile: -(1 - e) log sig(beta d) - e log sig(-beta d)."""
    beta = 0.1
    for e in (0.0, 0.1):
        expected = {"aot": (0.5, -6.0), "aot_unpaired": (-3.5, -2.0)}
        for loss_type, deltas in expected.items():
            losses, chosen, rejected = preference_loss(*BATCH, beta=beta, loss_type=loss_type, label_smoothing=e)
            hand = [-(1 - e) * logsig(beta * d) - e * logsig(-beta * d) for d in deltas]
            torch.testing.assert_close(losses, logps(*hand), atol=1e-12, rtol=0)
            torch.testing.assert_close(chosen, logps(-0.7, 0.0))  # rewards stay per pair, unsorted
            torch.testing.assert_close(rejected, logps(0.2, -0.35))
    # reference-free: the reference margins are 0, so aot's d is the sorted policy margins [-2, 1]
    losses, _, _ = preference_loss(BATCH[0], BATCH[1], None, None, beta=beta, loss_type="aot")
    torch.testing.assert_close(losses, logps(-logsig(-0.2), -logsig(0.1)), atol=1e-12, rtol=0)


def test_orpo_hand_value_and_reference_free():
    """ORPO (eqs. 4, 6, 7) on per-token averages avg_c -0.5, avg_r -1.2, lambda = beta = 0.1:
    log odds(a) = a - log(1 - e^a); loss = -avg_c - lambda log sig(log odds(avg_c) - log odds(avg_r)).
    Rewards, as TRL's ORPOTrainer: beta x avg."""
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.2 - math.log(1 - math.exp(-1.2)))
    expected = 0.5 - 0.1 * logsig(log_odds)
    loss, chosen, rejected = one("orpo", args=(logps(-0.5), logps(-1.2), None, None))
    assert loss == pytest.approx(expected, abs=1e-12)
    assert (chosen, rejected) == (pytest.approx(-0.05), pytest.approx(-0.12))
    with pytest.raises(ValueError, match="orpo is reference-free"):
        one("orpo", args=(logps(-0.5), logps(-1.2), logps(-0.5), logps(-1.2)))
    # log(1 - e^x) on both sides of its branch point -ln 2, and near 0 where 1 - e^x cancels
    for x in (-3.0, -0.7, -0.69, -1e-8):
        assert log1mexp(logps(x)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


F_DIVERGENCE_S = {
    # score s = f'(t) at t = exp(r), with f''s constants (they cancel in h, not per token); r_c = 0.5, r_r = -0.3
    "reverse_kl": (0.5, -0.3),
    "forward_kl": (1 - math.exp(-0.5), 1 - math.exp(0.3)),  # f'(t) = 1 - 1/t
    "js_divergence": (math.log(2 * math.exp(0.5) / (1 + math.exp(0.5))),  # f'(t) = log(2t / (1 + t))
                      math.log(2 * math.exp(-0.3) / (1 + math.exp(-0.3)))),
    "alpha_divergence": ((math.exp(-0.25) - 1) / -0.5, (math.exp(0.15) - 1) / -0.5),  # (t^(a-1) - 1) / (a - 1), a 0.5
}


@pytest.mark.parametrize("f_divergence", sorted(F_DIVERGENCE_S))
def test_f_divergence_regularizers(f_divergence):
    """sigmoid on h = s_c - s_r; sigmoid_norm and ipo on s_c / n_c - s_r / n_r (4 and 2 tokens), where the constants
    of f' stay; the rewards stay beta r."""
    s_c, s_r = F_DIVERGENCE_S[f_divergence]
    loss, chosen, rejected = one("sigmoid", f_divergence_type=f_divergence)
    assert loss == pytest.approx(-logsig(0.1 * (s_c - s_r)), abs=1e-12)
    assert chosen == pytest.approx(0.05) and rejected == pytest.approx(-0.03)  # rewards: the log-ratio, as TRL
    tokens = dict(chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    per_token = s_c / 4 - s_r / 2
    assert one("sigmoid_norm", f_divergence_type=f_divergence, **tokens)[0] == pytest.approx(
        -logsig(0.1 * per_token), abs=1e-12)
    assert one("ipo", f_divergence_type=f_divergence, **tokens)[0] == pytest.approx((per_token - 5) ** 2, abs=1e-12)
    assert one("hinge", f_divergence_type=f_divergence)[0] == pytest.approx(max(0.0, 1 - 0.1 * (s_c - s_r)), abs=1e-12)


@pytest.mark.parametrize("loss_type", sorted(name for name, t in LOSSES.items() if t.f_divergence == "undefined"
                                             and not t.reference_free))
def test_f_divergence_refused_where_undefined(loss_type):
    """The losses that read one side alone (or sort log-ratios) have no f-divergence form; refused, as TRL 1.16."""
    with pytest.raises(ValueError, match=f"f_divergence_type=forward_kl is not defined for {loss_type}: f-DPO"):
        one(loss_type, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="would be ignored: sft reads no log-ratio"):
        one("sft", f_divergence_type="js_divergence", chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    # with a loss that reads it, sft's term is unchanged and the other's takes the scores
    s_c, s_r = F_DIVERGENCE_S["forward_kl"]
    mixed = one(["sigmoid", "sft"], f_divergence_type="forward_kl", chosen_tokens=torch.tensor([4]),
                rejected_tokens=torch.tensor([2]))[0]
    assert mixed == pytest.approx(-logsig(0.1 * (s_c - s_r)) + 10 / 4, abs=1e-12)


def test_alpha_divergence_at_one_is_reverse_kl():
    assert one("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)[0] == pytest.approx(
        -logsig(0.08), abs=1e-12)


def test_weighted_combination_mpo():
    """MPO's mix: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft (chosen 4 tokens: sft = 10 / 4)."""
    expected = 0.8 * -logsig(0.08) + 0.2 * (-logsig(0.05) - logsig(0.03)) + 1.0 * 2.5
    loss, chosen, rejected = one(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                                 chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    assert loss == pytest.approx(expected, abs=1e-12)
    assert one(["sigmoid", "hinge"])[0] == pytest.approx(-logsig(0.08) + (1 - 0.08), abs=1e-12)  # weights default 1


def test_length_desensitized_logps():
    """LD-DPO: shared part -6 of a -10 response, alpha 0.5: -6 + 0.5 (-10 - -6) = -8; alpha 1 is the plain sum,
    alpha 0 the shared part alone."""
    shared, total = logps(-6.0, -3.0), logps(-10.0, -3.0)  # the second response is the shorter: all shared
    torch.testing.assert_close(length_desensitized_logps(shared, total, 0.5), logps(-8.0, -3.0))
    torch.testing.assert_close(length_desensitized_logps(shared, total, 1.0), total)
    torch.testing.assert_close(length_desensitized_logps(shared, total, 0.0), shared)
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        length_desensitized_logps(shared, total, 1.5)


def test_wpo_weights_and_pair_weights():
    """WPO: w = exp(mean_t a_t) per side; a chosen sum of -1.2 over 3 tokens and a rejected -0.4 over 2:
    exp(-0.4) exp(-0.2) = exp(-0.6). The pair's loss is multiplied by it, and no gradient flows into it."""
    aligned_chosen = logps(-1.2).requires_grad_()
    weight = wpo_weights(aligned_chosen, torch.tensor([3]), logps(-0.4), torch.tensor([2]))
    assert weight.item() == pytest.approx(math.exp(-0.6)) and not weight.requires_grad
    loss = one("sigmoid", pair_weights=weight)[0]
    assert loss == pytest.approx(math.exp(-0.6) * -logsig(0.08), abs=1e-12)
    with pytest.raises(ValueError, match="WPO weighting is not defined for aot"):
        preference_loss(*BATCH, beta=0.1, loss_type="aot", pair_weights=logps(1.0, 1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type=["sigmoid", "dpo"]), "loss_type 'dpo' is not one of"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 weights for 2 loss types"),
        (dict(loss_type=["sigmoid", "sigmoid"]), "names a loss twice"),
        (dict(loss_type="exo_pair"), "exo_pair needs label_smoothing above 0"),
        (dict(loss_type="sft"), "need chosen_tokens and rejected_tokens"),
        (dict(f_divergence_type="kl"), "f_divergence_type 'kl' is not one of"),
        (dict(loss_type="nca_pair", label_smoothing=0.1), "label_smoothing applies to"),
    ],
)
def test_bad_new_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        preference_loss(*PAIR, beta=0.1, **kwargs)


def test_config_names_match_the_loss_module():
    """Each record of the config's registry has its function in the loss module, per pair or, listwise, per ranked
    group, and no function is left over."""
    assert list(PER_PAIR) == [name for name, t in LOSSES.items() if not t.listwise]
    assert list(PER_GROUP) == [name for name, t in LOSSES.items() if t.listwise]


def in_order_once(names):
    return list(dict.fromkeys(names))


def test_the_docs_list_the_registry():
    """docs/losses.md's table has a row for each loss type of the registry, in its order, and no other (sigmoid has a
    second row, with label smoothing)."""
    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "losses.md").read_text(encoding="utf-8")
    section = page.split("\n## ", 1)[0]
    lines = section.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| `loss_type` |"))
    rows = [line for line in lines[header + 2:] if line.startswith("| `")]  # below the header and its |---| line
    assert in_order_once(re.match(r"\| `(\w+)`", row).group(1) for row in rows) == list(LOSSES)


def test_loss_module_docstring_lists_the_registry():
    """The table at the top of dpo_dist/train/loss.py: a row for each loss type, in the registry's order."""
    lines = loss_module.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("loss_type "))
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("===="))
    names = [line.split()[0] for line in lines[start + 2:end] if line and not line[0].isspace()]
    assert in_order_once(names) == list(LOSSES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.loss_type=[sigmoid, bco_pair, sft]", "loss.loss_weights=[0.8, 0.2]"],
         "loss.loss_weights has 2 weights for the 3 loss types in loss.loss_type (['sigmoid', 'bco_pair', 'sft'])"),
        (["loss.loss_type=[sigmoid, nope]"], "loss.loss_type[1]: 'nope' is not one of sigmoid, robust, hinge, ipo"),
        (["loss.loss_type=dpo"], "loss.loss_type: 'dpo' is not one of sigmoid, robust"),
        (["loss.loss_type=[orpo, sft]", "reference.mode=none"], "orpo takes length-averaged log-probs and no reference"),
        (["loss.loss_type=[aot, sigmoid]", "loss.use_weighting=true"], "loss.use_weighting (WPO) is not defined for aot"),
        (["loss.loss_type=orpo", "reference.mode=none", "loss.f_divergence_type=js_divergence"],
         "loss.f_divergence_type regularizes the log-ratio to a reference; orpo has none"),
        (["loss.loss_type=[sigmoid, bco_pair]", "loss.f_divergence_type=forward_kl"],
         "loss.f_divergence_type=forward_kl is not defined for bco_pair: f-DPO's reparameterization leaves a beta log"),
        (["loss.loss_type=sft", "loss.f_divergence_type=alpha_divergence"],
         "loss.f_divergence_type=alpha_divergence would be ignored: sft reads no log-ratio to the reference"),
        (["reference.sync_ref_model=true"], "cannot follow a reference that moves"),
        (["reference.ref_model_sync_steps=64"], "reference.ref_model_sync_steps: TR-DPO's moving reference"),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_config_takes_a_weighted_list():
    cfg = load_config(None, ["loss.loss_type=[sigmoid, bco_pair, sft]", "loss.loss_weights=[0.8, 0.2, 1]",
                             "loss.ld_alpha=0.5", "loss.use_weighting=true"])
    assert cfg.loss.types() == ("sigmoid", "bco_pair", "sft") and cfg.loss.loss_weights == [0.8, 0.2, 1.0]
    assert load_config(None, []).loss.types() == ("sigmoid",)
