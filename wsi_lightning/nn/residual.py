"""Scaled residual ``omega * x + f(x)`` with the Admin shortcut scale (Liu et al., EMNLP 2020).

Admin ("Understanding the Difficulty of Training Transformers") rescales each shortcut by a
constant ω chosen from the total number N of residual layers so that the output change caused by
a parameter perturbation grows as O(log N) instead of O(N). We use the closed form of admin-torch
0.1.0 (``as_module(N)`` with its default ``output_change_scale``, a constant buffer)::

    "logn" (default): ω = sqrt((N + 1) / ln(N + 1) − 1)     e.g. N = 8 -> ω ≈ 1.7596
    "1":              ω = sqrt(N)
    "n":              ω = 1                                 (the ordinary residual)

HAG-MIL builds each TransLayer's residual with N = 8. ``plain=True`` forces ω = 1, which the
spec allows as a simplification.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALES = ("logn", "1", "n")


def admin_omega(num_layers: int, output_change_scale: str = "logn") -> float:
    """The Admin shortcut scale ω for ``num_layers`` residual layers (formulas in module doc).

    Args:
        num_layers: total number N of residual layers (>= 1).
        output_change_scale: ``"logn"`` (Admin default), ``"1"`` or ``"n"`` (ω = 1).
    """
    if num_layers < 1:
        raise ValueError(f"admin_omega: num_layers={num_layers} must be >= 1")
    if output_change_scale == "logn":
        return math.sqrt((num_layers + 1) / math.log(num_layers + 1) - 1)
    if output_change_scale == "1":
        return math.sqrt(num_layers)
    if output_change_scale == "n":
        return 1.0
    raise ValueError(f"admin_omega: output_change_scale '{output_change_scale}' unknown; "
                     f"expected one of {list(SCALES)}")


class ScaledResidual(nn.Module):
    """``omega * x + fx`` with a constant ``omega`` (not trained).

    Args:
        num_layers: total number of residual layers N the scale is computed for.
        plain: use ω = 1 (an ordinary residual ``x + fx``).
        output_change_scale: see :func:`admin_omega`.
    """

    def __init__(self, num_layers: int = 8, plain: bool = False,
                 output_change_scale: str = "logn") -> None:
        super().__init__()
        self.omega = 1.0 if plain else admin_omega(num_layers, output_change_scale)

    def forward(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """x: shortcut (..., D); fx: sublayer output (..., D) -> (..., D)."""
        return fx + x if self.omega == 1.0 else fx + self.omega * x

    def extra_repr(self) -> str:
        return f"omega={self.omega:.6f}"
