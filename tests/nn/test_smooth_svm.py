"""SmoothTop1SVM against a direct computation of its formula and its hard (τ -> 0) limit."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_lightning.nn.smooth_svm import SmoothTop1SVM, smooth_top1_svm


def slow_smooth_svm(x: torch.Tensor, y: torch.Tensor, alpha: float, tau: float) -> float:
    """τ · log Σ_j exp((x_j + α[j ≠ y] − x_y) / τ), averaged, one sample and class at a time."""
    total = 0.0
    for s in range(x.shape[0]):
        yi = int(y[s])
        acc = 0.0
        for j in range(x.shape[1]):
            acc += math.exp((float(x[s, j]) + alpha * (j != yi) - float(x[s, yi])) / tau)
        total += tau * math.log(acc)
    return total / x.shape[0]


def hard_svm(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """max_j (x_j + α[j ≠ y]) − x_y per sample: (S,)."""
    out = []
    for s in range(x.shape[0]):
        yi = int(y[s])
        out.append(max(float(x[s, j]) + alpha * (j != yi) for j in range(x.shape[1]))
                   - float(x[s, yi]))
    return torch.tensor(out)


@pytest.mark.parametrize(("alpha", "tau"), [(1.0, 1.0), (0.5, 2.0), (1.0, 0.1)])
def test_matches_slow_formula(alpha, tau):
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    got = smooth_top1_svm(x, y, alpha, tau)
    assert float(got) == pytest.approx(slow_smooth_svm(x, y, alpha, tau), rel=1e-6)
    assert float(SmoothTop1SVM(alpha, tau)(x, y)) == pytest.approx(float(got))


def test_hand_computed_two_class_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0, 0])
    # sample 1: log(e^0 + e^(2 + 1 - 1)) = log(1 + e^2); sample 2: log(1 + e^(0 + 1 - 3))
    expected = (math.log(1 + math.e**2) + math.log(1 + math.e**-2)) / 2
    assert float(smooth_top1_svm(x, y)) == pytest.approx(expected, rel=1e-6)
    assert smooth_top1_svm(x, y, reduction="none").tolist() == pytest.approx(
        [2.126928, 0.126928], abs=1e-6)
    assert smooth_top1_svm(x, y, tau=0.0, reduction="none").tolist() == [2.0, 0.0]


def test_tau_to_zero_approaches_hard_svm():
    torch.manual_seed(0)
    x = 3 * torch.randn(20, 5)
    y = torch.randint(0, 5, (20,))
    hard = hard_svm(x, y, 1.0)
    for tau in (1.0, 0.1, 1e-3):
        soft = smooth_top1_svm(x, y, tau=tau, reduction="none")
        assert torch.all(soft >= hard - 1e-5)
        assert torch.all(soft <= hard + tau * math.log(5) + 1e-5)
    torch.testing.assert_close(smooth_top1_svm(x, y, tau=1e-4, reduction="none"), hard,
                               atol=1e-3, rtol=0)


def test_stable_and_finite_gradients_on_huge_scores():
    x = torch.tensor([[1e4, -1e4, 0.0], [5e3, 5e3, -1e3]], requires_grad=True)
    y = torch.tensor([1, 0])
    loss = smooth_top1_svm(x, y, tau=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    expected = (2e4 + 1 + 0.5 * math.log(1 + math.e**2)) / 2  # sample 2: 0.5·log(e^0 + e^(1/0.5))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_invalid_arguments():
    x, y = torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="tau"):
        smooth_top1_svm(x, y, tau=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        smooth_top1_svm(x, y, reduction="max")
