"""Instance embedding MLPs and per-target classification heads."""

from __future__ import annotations

import torch
from torch import nn


def instance_mlp(in_dim: int, hidden: int, dropout: float = 0.0, layers: int = 1) -> nn.Sequential:
    """``layers`` x (Linear -> ReLU -> Dropout), applied to each instance: (..., D) -> (..., hidden)."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
        d = hidden
    return nn.Sequential(*mods)


class MultiHead(nn.Module):
    """One linear softmax head per target: (..., D) -> {target: (..., C_t)}."""

    def __init__(self, in_dim: int, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Linear(in_dim, c) for t, c in num_classes.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: head(z) for t, head in self.heads.items()}


def decision_mlp(in_dim: int, hidden: tuple[int, ...] = (200, 100), activation: str = "sigmoid",
                 dropout: float = 0.5) -> nn.Sequential:
    """The slide-level MLP of CHOWDER and the interpretability study: (..., M) -> (..., hidden[-1]).

    Args:
        in_dim: slide descriptor size M.
        hidden: hidden layer sizes (200, 100 in the papers).
        activation: ``sigmoid`` (CHOWDER) or ``relu``.
        dropout: dropout after each hidden layer (never on the descriptor itself: CHOWDER's
            has only 2R = 10 entries).
    """
    acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation '{activation}' unknown; expected one of {sorted(acts)}")
    mods: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        mods += [nn.Linear(d, h), acts[activation](), nn.Dropout(dropout)]
        d = h
    return nn.Sequential(*mods)
