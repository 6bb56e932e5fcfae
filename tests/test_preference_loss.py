"""The preference losses (vargpt.training.preference) against hand computations, one per loss type."""

from __future__ import annotations

import math

import pytest
import torch

from vargpt.training.preference import PreferenceSettings, preference_loss

# Two pairs: summed log-probs of (chosen, rejected), the positions each sum covers, the reference's sums.
POLICY = torch.tensor([[-10.0, -14.0], [-20.0, -18.0]])
COUNTS = torch.tensor([[4.0, 4.0], [5.0, 6.0]])
REFERENCE = torch.tensor([[-11.0, -13.0], [-19.0, -19.0]])


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_is_dpo_on_summed_logps():
    beta, smooth = 0.1, 0.2
    out = preference_loss(PreferenceSettings("sigmoid", beta, label_smoothing=smooth), POLICY, COUNTS, REFERENCE)
    # z = (pi_c - pi_r) - (ref_c - ref_r): pair 0: 4 - 2 = 2; pair 1: -2 - 0 = -2
    expected = [-(1 - smooth) * _logsigmoid(beta * z) - smooth * _logsigmoid(-beta * z) for z in (2.0, -2.0)]
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # rewards beta * (pi - ref): chosen (0.1, -0.1), rejected (-0.1, 0.1)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-7)
    assert out.metrics["rewards/margins"].item() == pytest.approx((0.2 - 0.2) / 2, abs=1e-7)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(0.5)
    assert out.metrics["logps/chosen"].item() == pytest.approx(-15.0)


def test_ipo_uses_length_averaged_logps():
    beta = 0.5
    out = preference_loss(PreferenceSettings("ipo", beta), POLICY, COUNTS, REFERENCE)
    avg = POLICY / COUNTS
    ref = REFERENCE / COUNTS
    z = (avg[:, 0] - avg[:, 1]) - (ref[:, 0] - ref[:, 1])
    expected = ((z - 1 / (2 * beta)) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_orpo_needs_no_reference():
    beta = 0.1
    out = preference_loss(PreferenceSettings("orpo", beta), POLICY, COUNTS, None)
    losses = []
    for (c, r), (nc, nr) in zip(POLICY.tolist(), COUNTS.tolist(), strict=True):
        pc, pr = c / nc, r / nr
        log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
        losses.append(-pc - beta * _logsigmoid(log_odds))
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * (-10 / 4 - 20 / 5) / 2, rel=1e-6)


def test_simpo_margin():
    beta, gamma = 2.0, 0.5
    out = preference_loss(PreferenceSettings("simpo", beta, simpo_gamma=gamma), POLICY, COUNTS, None)
    avg = (POLICY / COUNTS).tolist()
    expected = [-_logsigmoid(beta * (c - r) - gamma) for c, r in avg]
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_ftx_adds_the_chosen_nll():
    plain = preference_loss(PreferenceSettings("sigmoid", 0.1), POLICY, COUNTS, REFERENCE)
    with_sft = preference_loss(PreferenceSettings("sigmoid", 0.1, ftx=0.5), POLICY, COUNTS, REFERENCE)
    sft = (10 / 4 + 20 / 5) / 2
    assert with_sft.metrics["sft_loss"].item() == pytest.approx(sft)
    assert with_sft.loss.item() == pytest.approx(plain.loss.item() + 0.5 * sft, rel=1e-6)


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    out = preference_loss(PreferenceSettings("sigmoid", 0.3), POLICY, COUNTS, POLICY.clone())
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert out.metrics[name].item() == 0.0


def test_gradient_raises_the_chosen_and_lowers_the_rejected():
    policy = POLICY.clone().requires_grad_(True)
    preference_loss(PreferenceSettings("sigmoid", 0.1), policy, COUNTS, REFERENCE).loss.backward()
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()


def test_a_reference_loss_without_reference_logps_is_refused():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceSettings("sigmoid"), POLICY, COUNTS, None)
    with pytest.raises(ValueError, match="loss_type='hinge'.*sigmoid, ipo, orpo, simpo"):
        PreferenceSettings("hinge")
