"""Preference losses against hand-computed values (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from dpo_dist.train.loss import LOSS_TYPES, preference_loss

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
    ],
)
def test_policy_equal_to_reference(loss_type, smoothing, beta, expected):
    """Policy = reference: every log-ratio is 0, rewards are 0."""
    policy = logps(-12.0, -3.5)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy, policy - 1.0, policy.clone(), policy - 1.0, beta=beta, loss_type=loss_type, label_smoothing=smoothing
    )
    torch.testing.assert_close(losses, torch.full((2,), expected, dtype=torch.float64))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_hand_values_off_zero():
    """policy_chosen -10, ref_chosen -12, policy_rejected -9, ref_rejected -8, beta 0.5:
    chosen log-ratio +2, rejected -1, h = 3, beta h = 1.5.
    sigmoid: -log sigma(1.5) = log(1 + e^-1.5) = 0.2014133
    cDPO e=0.1: 0.9 * 0.2014133 + 0.1 * log(1 + e^1.5) = 0.9 * 0.2014133 + 0.1 * 1.7014133 = 0.3514133
    robust e=0.1: (0.9 * 0.2014133 - 0.1 * 1.7014133) / 0.8 = 0.0139133
    hinge: max(0, 1 - 1.5) = 0;  ipo: (3 - 1)^2 = 4
    rewards: chosen 0.5 * 2 = 1.0, rejected 0.5 * -1 = -0.5."""
    args = (logps(-10.0), logps(-9.0), logps(-12.0), logps(-8.0))
    expected = {"sigmoid": 0.2014133, "hinge": 0.0, "ipo": 4.0}
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


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "simpo"])
def test_swapping_chosen_and_rejected(loss_type):
    """Swapping sides negates h and swaps the rewards. sigmoid: loss(h) - loss(-h) = -beta h (log sigma(x) -
    log sigma(-x) = x); ipo: (h - c)^2 vs (h + c)^2."""
    beta, pc, pr, rc, rr = 0.5, logps(-10.0), logps(-9.0), logps(-12.0), logps(-8.0)
    forward = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    swapped = preference_loss(pr, pc, rr, rc, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(forward[1], swapped[2])
    torch.testing.assert_close(forward[2], swapped[1])
    h = 3.0
    if loss_type == "sigmoid":
        assert (forward[0] - swapped[0]).item() == pytest.approx(-beta * h)
    if loss_type == "ipo":
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
