"""Ranking losses (the listwise loss types) and ranking metrics against values computed by hand with math."""

import math
import re

import pytest
import torch

from dpo_dist.config import ConfigError, load_config
from dpo_dist.loss_types import CONFIG_WORDING, F_DIVERGENCES, check_loss_options
from dpo_dist.train.loss import f_divergence_scores, preference_loss, ranking_loss
from dpo_dist.train.metrics import RANKING_COUNTS, ranking_accuracies, ranking_counts

NAN, INF = float("nan"), float("inf")


def values(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def present(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def pl_by_hand(rewards, m=None):
    """-sum_{j=1..m} [r_j - log sum_{l=j..k} exp(r_l)] for one ranking's rewards, best first, with math."""
    k = len(rewards)
    m = k if m is None else min(m, k)
    return -sum(rewards[j] - math.log(sum(math.exp(r) for r in rewards[j:])) for j in range(m))


# Three groups of k = 2, 3, 4 responses, best first, padded to K = 4 (padding holds junk: it must not be read).
POLICY = values([-3.0, -5.5, NAN, NAN], [-10.0, -12.5, -9.0, INF], [-4.0, -6.0, -5.0, -8.5])
REFERENCE = values([-4.0, -5.0, 0.0, 0.0], [-11.0, -12.0, -10.5, -INF], [-4.5, -5.0, -5.5, -7.0])
MASK = present([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1])
BETA = 0.3
# log-ratios r = policy - reference, group by group: [1, -0.5], [1, -0.5, 1.5], [0.5, -1, 0.5, -1.5]
LOGRATIOS = [[1.0, -0.5], [1.0, -0.5, 1.5], [0.5, -1.0, 0.5, -1.5]]


def test_plackett_luce_by_hand_on_groups_of_2_3_and_4():
    """The three groups' losses against the formula computed with math, to 1e-12 in float64; the first group (k = 2,
    rewards 0.3 and -0.15) written out: -(0.3 - log(e^0.3 + e^-0.15)) - (-0.15 - log e^-0.15) = log(1 + e^-0.45)."""
    losses, rewards = ranking_loss(POLICY, REFERENCE, MASK, beta=BETA)
    hand = [pl_by_hand([BETA * r for r in group]) for group in LOGRATIOS]
    assert hand[0] == pytest.approx(math.log1p(math.exp(-0.45)), abs=1e-15)
    torch.testing.assert_close(losses, values(*hand), atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, values(*[[BETA * r for r in g] + [0.0] * (4 - len(g)) for g in LOGRATIOS]),
                               atol=1e-12, rtol=0)
    assert not rewards.requires_grad
    # the batch loss is the mean over groups, as pair_losses takes losses.mean() over pairs
    assert losses.mean().item() == pytest.approx(sum(hand) / 3, abs=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_top_m_by_hand(m):
    """ranking_top_m scores each group's first m choices; past a group's k - 1 a choice adds 0 (the last one is
    certain), so m >= k - 1 is the whole ranking."""
    losses, _ = ranking_loss(POLICY, REFERENCE, MASK, beta=BETA, ranking_top_m=m)
    hand = [pl_by_hand([BETA * r for r in group], m) for group in LOGRATIOS]
    torch.testing.assert_close(losses, values(*hand), atol=1e-12, rtol=0)
    if m >= 3:
        torch.testing.assert_close(losses, ranking_loss(POLICY, REFERENCE, MASK, beta=BETA)[0], atol=1e-12, rtol=0)


def test_at_the_reference_it_is_log_k_factorial():
    """Policy = reference: every reward is 0 and each choice is one of the k - j + 1 responses left, equally likely:
    ln(k!) for the whole ranking, sum_{j=1..m} ln(k - j + 1) for the top m. Groups of k = 1..5 in one batch."""
    policy = torch.full((5, 5), -7.0, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.arange(1, 6)[:, None]  # group g has k = g + 1 responses
    for f in F_DIVERGENCES:
        losses, rewards = ranking_loss(policy, policy.clone(), mask, beta=0.1, f_divergence_type=f)
        torch.testing.assert_close(losses, values(*[math.log(math.factorial(k)) for k in range(1, 6)]), atol=1e-12,
                                   rtol=0)
        assert rewards.abs().max() == 0
    for m in (1, 2, 3):
        losses, _ = ranking_loss(policy, policy.clone(), mask, beta=0.1, ranking_top_m=m)
        want = [sum(math.log(k - j + 1) for j in range(1, min(m, k) + 1)) for k in range(1, 6)]
        torch.testing.assert_close(losses, values(*want), atol=1e-12, rtol=0)
    assert want[4] == pytest.approx(math.log(5 * 4 * 3))


@pytest.mark.parametrize("f_divergence", F_DIVERGENCES)
def test_two_responses_are_the_sigmoid_loss(f_divergence):
    """k = 2: -(beta s_c - log(e^(beta s_c) + e^(beta s_r))) = -log sigma(beta (s_c - s_r)), sigmoid's loss with
    label_smoothing 0, under every f-divergence; the rewards are the pair's."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    pairwise, chosen, rejected = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
                                                 f_divergence_type=f_divergence)
    listwise, rewards = ranking_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.5,
                                     f_divergence_type=f_divergence)
    torch.testing.assert_close(listwise, pairwise, atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, torch.stack([chosen, rejected], 1), atol=0, rtol=0)
    free, _ = ranking_loss(torch.stack([pc, pr], 1), None, beta=0.5)  # reference-free: the reference taken as 0
    torch.testing.assert_close(free, preference_loss(pc, pr, None, None, beta=0.5)[0], atol=1e-12, rtol=0)


def test_padding_changes_no_group():
    """A group's loss is the same alone (K = k) as padded beside longer groups, whatever the padding holds and
    wherever it sits (a gap at position 1: the order is that of the responses present)."""
    batch, _ = ranking_loss(POLICY, REFERENCE, MASK, beta=BETA)
    for i, k in enumerate((2, 3, 4)):
        alone, _ = ranking_loss(POLICY[i:i + 1, :k], REFERENCE[i:i + 1, :k], beta=BETA)
        assert alone.item() == pytest.approx(batch[i].item(), abs=1e-12)
    gapped_policy = values([-10.0, 5.0, -12.5, -9.0])
    gapped_reference = values([-11.0, NAN, -12.0, -10.5])
    gapped, _ = ranking_loss(gapped_policy, gapped_reference, present([1, 0, 1, 1]), beta=BETA)
    assert gapped.item() == pytest.approx(batch[1].item(), abs=1e-12)
    for m in (1, 2):  # truncation counts positions among the responses present
        assert ranking_loss(gapped_policy, gapped_reference, present([1, 0, 1, 1]), beta=BETA, ranking_top_m=m)[0].item() \
            == pytest.approx(ranking_loss(POLICY, REFERENCE, MASK, beta=BETA, ranking_top_m=m)[0][1].item(), abs=1e-12)


def test_gradients_are_finite_and_padding_gets_none():
    """Gradients are finite with junk padding and with log-ratios of thousands (logsumexp does not overflow); padding
    gets exactly 0. At the reference, the best response is pushed up and the worst down:
    d loss / d r_j = beta (sum_{i<=j} 1/(k-i+1) - 1) for k = 3 is beta (-2/3, -1/6, 5/6)."""
    policy = POLICY.clone().requires_grad_()
    ranking_loss(policy, REFERENCE, MASK, beta=BETA)[0].sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[~MASK] == 0).all()
    far = values([3000.0, 0.0, -2000.0], [-5000.0, 0.0, 4000.0]).requires_grad_()
    losses, _ = ranking_loss(far, torch.zeros_like(far), beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(far.grad).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)  # in order by a wide margin: probability 1
    assert losses[1].item() == pytest.approx(9000.0 + 4000.0, rel=1e-12)  # -(-5000 - 4000) - (0 - 4000)
    at_reference = values([-1.0, -2.0, -3.0]).requires_grad_()
    ranking_loss(at_reference, values([-1.0, -2.0, -3.0]), beta=0.1)[0].sum().backward()
    torch.testing.assert_close(at_reference.grad, values([-2 / 3, -1 / 6, 5 / 6]) * 0.1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("f_divergence", F_DIVERGENCES)
def test_a_constant_per_prompt_cancels(f_divergence):
    """f-DPO's reparameterization leaves beta log Z(x), one constant per prompt, beside beta s: the Plackett-Luce loss
    of scores moved by one constant per group is the loss of the scores, which is why every f-divergence applies."""
    scores = f_divergence_scores(values(*LOGRATIOS[2]), f_divergence, 0.5)
    by_hand = pl_by_hand([BETA * s for s in scores.tolist()])
    assert pl_by_hand([BETA * s + 2.7 for s in scores.tolist()]) == pytest.approx(by_hand, abs=1e-12)
    losses, _ = ranking_loss(POLICY[2:], REFERENCE[2:], beta=BETA, f_divergence_type=f_divergence)
    assert losses.item() == pytest.approx(by_hand, abs=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: preference_loss(values(-1.0), values(-2.0), None, None, beta=0.1, loss_type="plackett_luce"),
         "loss_type=plackett_luce is listwise (it scores a whole ranking of k responses per prompt): it needs groups of "
         "ranked responses: ranking_loss"),
        (lambda: preference_loss(values(-1.0), values(-2.0), None, None, beta=0.1,
                                 loss_type=["sigmoid", "plackett_luce"]),
         "loss_type mixes listwise plackett_luce with pairwise sigmoid"),
        (lambda: ranking_loss(POLICY, REFERENCE, MASK, beta=0.1, loss_type="sigmoid"),
         "loss_type=sigmoid is pairwise (one term per chosen/rejected pair): it needs pairs: preference_loss"),
        (lambda: ranking_loss(POLICY, REFERENCE, MASK, beta=0.1, ranking_top_m=0), "ranking_top_m is how many"),
        (lambda: ranking_loss(POLICY, REFERENCE[:, :3], MASK, beta=0.1), "ref_logps has shape (3, 3)"),
        (lambda: ranking_loss(POLICY, REFERENCE, MASK.int(), beta=0.1), "mask must be bool"),
        (lambda: ranking_loss(POLICY[0], REFERENCE[0], MASK[0], beta=0.1), "policy_logps must be (groups, responses)"),
    ],
)
def test_function_refusals(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def ranking_options(**changes):
    """check_loss_options for plackett_luce with data.responses=ranking and the config's wording, plus changes."""
    kwargs = dict(label_smoothing=0.0, discopop_tau=0.05, f_divergence_type="reverse_kl", with_reference=True,
                  weighted=False, wording=CONFIG_WORDING, responses="ranking")
    types = changes.pop("types", ("plackett_luce",))
    return check_loss_options(types, None, **{**kwargs, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(types=("sigmoid",)), "loss.loss_type=sigmoid is pairwise (one term per chosen/rejected pair): it needs "
                                   "data.responses=pairs; a ranking of k responses takes plackett_luce"),
        (dict(types=("sft",)), "loss.loss_type=sft is pairwise"),
        (dict(types=("plackett_luce", "sigmoid")), "loss.loss_type mixes listwise plackett_luce with pairwise sigmoid: "
                                                   "a listwise loss has one term per ranked group of k responses"),
        (dict(responses="pairs"), "loss.loss_type=plackett_luce is listwise (it scores a whole ranking of k responses "
                                  "per prompt): it needs data.responses=ranking"),
        (dict(label_smoothing=0.1), "loss.label_smoothing is not defined for plackett_luce: it is the probability that "
                                    "a pair's label is flipped (cDPO)"),
        (dict(ld_alpha=0.5), "loss.ld_alpha (LD-DPO) weights a pair's longer response"),
        (dict(weighted=True), "loss.use_weighting (WPO) weights a pair by its two responses' probabilities"),
        (dict(rpo_alpha=0.5), "loss.rpo_alpha (RPO) adds an NLL on a pair's chosen response"),
        (dict(ranking_top_m=0), "loss.ranking_top_m is how many of a ranking's first positions are scored: 1 or more"),
        (dict(responses="triples"), "responses 'triples' is not one of pairs, ranking"),
        (dict(types=("sigmoid",), responses="pairs", ranking_top_m=2),
         "loss.ranking_top_m truncates a ranking loss to its top positions; it applies to plackett_luce, not sigmoid"),
    ],
)
def test_ranking_refusals(changes, message):
    """What plackett_luce does not take, each with its reason, in the config's terms (data.responses=ranking)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        ranking_options(**changes)


def test_ranking_accepts():
    """Every f-divergence (a constant per prompt cancels), a top m, and no reference (its log-probs taken as 0)."""
    for f in F_DIVERGENCES:
        assert ranking_options(f_divergence_type=f, ranking_top_m=2) == (1.0,)
    assert ranking_options(with_reference=False) == (1.0,)


def test_config_without_ranked_data_refuses_plackett_luce():
    """This tree's data config gives pairs (data.responses comes with the ranked data), so the config refuses a
    listwise loss; ranking_top_m is a typed key that only a listwise loss takes."""
    with pytest.raises(ConfigError, match=re.escape("loss.loss_type=plackett_luce is listwise")):
        load_config(None, ["loss.loss_type=plackett_luce"])
    with pytest.raises(ConfigError, match=re.escape("loss.ranking_top_m truncates a ranking loss")):
        load_config(None, ["loss.ranking_top_m=2"])
    with pytest.raises(ConfigError, match="ranking_top_m"):
        load_config(None, ["loss.ranking_top_m=two"])
    assert load_config(None, []).loss.ranking_top_m is None


# Rewards of three groups (K = 4): k = 4 with one tie, k = 3 out of order at the top, k = 2 in order; and a group of
# one response, which is no ranking.
REWARDS = values([0.5, 0.2, 0.2, -1.0], [0.1, 0.3, -0.2, 9.0], [0.4, -0.4, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0])
REWARD_MASK = present([1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0])


def test_ranking_counts_by_hand():
    """Group 1 (k = 4): 6 ordered pairs; (1,2) (1,3) (1,4) (2,4) (3,4) in order, (2,3) tied: 5, and 0.5 is above all:
    a hit. Group 2 (k = 3, the 9.0 is padding): (1,3) and (2,3) in order, (1,2) not: 2 of 3; 0.1 < 0.3: no hit.
    Group 3 (k = 2): 1 of 1, a hit. Group 4 (k = 1): no pairs, not a ranking.
    Pooled: 8 of 10 pairs in order; 2 hits of 3 rankings."""
    counts = ranking_counts(REWARDS, REWARD_MASK)
    assert RANKING_COUNTS == ("pairs_in_order", "pairs", "top1_hits", "ranked_groups")
    torch.testing.assert_close(counts, values([5, 6, 1, 1], [2, 3, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]))
    assert ranking_accuracies(counts) == {"rewards/ranking_accuracies": pytest.approx(0.8),
                                          "rewards/top1_accuracies": pytest.approx(2 / 3)}
    # counts pool by sums: two halves give the whole batch's shares
    halves = torch.cat([ranking_counts(REWARDS[:2], REWARD_MASK[:2]), ranking_counts(REWARDS[2:], REWARD_MASK[2:])])
    assert ranking_accuracies(halves, prefix="eval/") == {"eval/rewards/ranking_accuracies": pytest.approx(0.8),
                                                          "eval/rewards/top1_accuracies": pytest.approx(2 / 3)}


def test_ranking_metrics_ties_gaps_and_pairs():
    """A tie for the top is no hit and an out-of-order pair; all rewards 0 (policy = reference) gives 0 for both.
    A gap in the mask: the best is the first response present. k = 2: both are rewards/accuracies."""
    counts = ranking_counts(values([0.5, 0.5, -1.0]), present([1, 1, 1]))
    torch.testing.assert_close(counts, values([2, 3, 0, 1]))
    zero = ranking_accuracies(ranking_counts(torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.bool)))
    assert zero == {"rewards/ranking_accuracies": 0.0, "rewards/top1_accuracies": 0.0}
    torch.testing.assert_close(ranking_counts(values([9.0, 0.2, 0.1]), present([0, 1, 1])), values([1, 1, 1, 1]))
    chosen, rejected = values(0.3, -0.1, 0.2, 0.0), values(0.1, 0.4, 0.2, -0.5)
    pairs = ranking_accuracies(ranking_counts(torch.stack([chosen, rejected], 1), torch.ones(4, 2, dtype=torch.bool)))
    accuracy = (chosen > rejected).double().mean().item()  # pair_losses' rewards/accuracies: 2 of 4
    assert pairs == {"rewards/ranking_accuracies": accuracy, "rewards/top1_accuracies": accuracy} and accuracy == 0.5
    nothing = ranking_accuracies(ranking_counts(values([1.0, 2.0]), present([1, 0])))
    assert all(math.isnan(v) for v in nothing.values())
