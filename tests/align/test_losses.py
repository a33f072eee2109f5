"""The preference losses against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.losses import LossConfig, bradley_terry, preference_loss

# Two pairs: policy and reference summed log-probabilities of the chosen and rejected replies.
CHOSEN, REJECTED = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-11.0, -12.5]), torch.tensor([-13.0, -11.5])
# h = (chosen - ref_chosen) - (rejected - ref_rejected) = [1 - (-1), 0.5 - 0.5] = [2, 0]
H = [2.0, 0.0]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def losses(name: str, **kw: float) -> list[float]:
    cfg = LossConfig(name, **kw)
    return preference_loss(cfg, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED).losses.tolist()


def test_dpo_sigmoid_and_its_label_smoothing() -> None:
    assert losses("sigmoid", beta=0.1) == pytest.approx([-logsig(0.2), math.log(2)])
    eps = 0.1
    expected = [-(1 - eps) * logsig(0.1 * h) - eps * logsig(-0.1 * h) for h in H]
    assert losses("sigmoid", beta=0.1, label_smoothing=eps) == pytest.approx(expected)


def test_robust_ipo_and_hinge() -> None:
    eps, beta = 0.2, 0.5
    robust = [(-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in H]
    assert losses("robust", beta=beta, label_smoothing=eps) == pytest.approx(robust)
    assert losses("ipo", beta=beta) == pytest.approx([(2 - 1.0) ** 2, (0 - 1.0) ** 2])  # (h - 1/(2 beta))^2
    assert losses("hinge", beta=beta) == pytest.approx([0.0, 1.0])  # relu(1 - beta h)


def test_simpo_is_reference_free_with_a_margin() -> None:
    # SimPO reads length-averaged log-probs: here [-2, -3] chosen and [-3.5, -2.75] rejected.
    chosen, rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-3.5, -2.75])
    terms = preference_loss(LossConfig("simpo", beta=2.0, gamma=0.5), chosen, rejected, None, None)
    # -log sigmoid(beta (c - r) - gamma)
    assert terms.losses.tolist() == pytest.approx([-logsig(2.0 * 1.5 - 0.5), -logsig(2.0 * -0.25 - 0.5)])
    assert terms.chosen_rewards.tolist() == pytest.approx([-4.0, -6.0])


def test_implicit_rewards_are_beta_times_the_log_ratio() -> None:
    terms = preference_loss(LossConfig("sigmoid", beta=0.5), CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.5, 0.25])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])


@pytest.mark.parametrize("name", ["exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down"])
def test_other_losses_prefer_the_better_pair(name: str) -> None:
    # Pair 0 favours chosen more than pair 1 does; each loss must be lower there, and lowering the rejected
    # reply's log-probability must never raise it.
    rejected = REJECTED.clone().requires_grad_(True)
    values = preference_loss(LossConfig(name, beta=0.5), CHOSEN, rejected, REF_CHOSEN, REF_REJECTED).losses
    assert values[0] < values[1]
    values.sum().backward()
    assert rejected.grad is not None and bool((rejected.grad >= 0).all())


def test_bradley_terry_with_margin_and_centring() -> None:
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    assert bradley_terry(chosen, rejected).tolist() == pytest.approx([-logsig(1.0), -logsig(-1.0)])
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry(chosen, rejected, margin).tolist() == pytest.approx([-logsig(0.5), -logsig(-1.0)])
    centred = bradley_terry(chosen, rejected, center=0.1).tolist()
    assert centred == pytest.approx([-logsig(1.0) + 0.1 * 1.0, -logsig(-1.0) + 0.1 * 0.0])
