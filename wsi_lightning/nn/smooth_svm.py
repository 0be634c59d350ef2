"""Smooth top-1 multi-class SVM loss (Berrada, Zisserman & Kumar, ICLR 2018).

For scores x ∈ R^C and true class y, with margin α and temperature τ::

    L_τ(x, y) = τ · log Σ_j exp((x_j + α·[j ≠ y] − x_y) / τ)

(the j = y term contributes exp(0)), averaged over samples. It is a smooth upper bound of the hard
top-1 SVM loss ``L_0(x, y) = max_j (x_j + α·[j ≠ y]) − x_y`` with
``L_0 <= L_τ <= L_0 + τ·log C``, so ``L_τ -> L_0`` as τ -> 0; ``tau=0`` computes L_0 directly.

Deviation from the smooth-topk package: it switches to the hard loss when scores/τ exceed 1e3 to
avoid overflow; ``torch.logsumexp`` subtracts the maximum first, so no switch is needed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smooth_top1_svm(scores: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
                    tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Smooth top-1 SVM loss (hard top-1 SVM when ``tau == 0``).

    Args:
        scores: (S, C) class scores.
        labels: (S,) int64 true classes.
        alpha: margin α.
        tau: temperature τ >= 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (returns (S,)).
    """
    if tau < 0:
        raise ValueError(f"smooth_top1_svm: tau={tau} must be >= 0")
    x = scores.float()
    margin = alpha * (1.0 - F.one_hot(labels, x.shape[1]).to(x.dtype))  # (S, C) α·[j ≠ y]
    z = x + margin - x.gather(1, labels[:, None])  # (S, C)
    loss = z.amax(1) if tau == 0 else tau * torch.logsumexp(z / tau, dim=1)  # (S,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"smooth_top1_svm: reduction '{reduction}' unknown; "
                     "expected one of ['mean', 'sum', 'none']")


class SmoothTop1SVM(nn.Module):
    """Module form of :func:`smooth_top1_svm`: ``forward(scores (S, C), labels (S,))``.

    Args:
        alpha: margin α (1 in HAG-MIL / CLAM).
        tau: temperature τ (1 in HAG-MIL / CLAM); 0 gives the hard top-1 SVM.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, alpha: float = 1.0, tau: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha, self.tau, self.reduction = alpha, tau, reduction

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return smooth_top1_svm(scores, labels, self.alpha, self.tau, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, tau={self.tau}"
