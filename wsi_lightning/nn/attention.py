"""Attention pooling over the instances of a bag (Ilse et al., 2018) and masked softmax."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over valid entries only; padded entries get exactly 0.

    Args:
        scores: (..., N) unnormalised scores.
        mask: (..., N) bool, True for valid entries (broadcastable to ``scores``).
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    a = torch.softmax(scores.float(), dim=dim).to(scores.dtype)
    return torch.nan_to_num(a, nan=0.0)  # a bag with no valid entry -> all zeros


class AttentionPool(nn.Module):
    """Ilse attention ``a = softmax_N(w^T tanh(V h))`` or its gated form
    ``a = softmax_N(w^T (tanh(V h) * sigmoid(U h)))``.

    Args:
        dim: instance embedding size M.
        hidden: attention hidden size L (128 in the paper).
        gated: use the gated variant.
        n_heads: number of attention maps (1 = the paper).
        dropout: dropout on the attention hidden layer.
    """

    def __init__(self, dim: int, hidden: int = 128, gated: bool = False, n_heads: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, n_heads)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            h: (B, N, M) instance embeddings.
            mask: (B, N) bool.

        Returns:
            z: (B, H, M) pooled bag embeddings; a: (B, H, N) attention, summing to 1 over valid N.
        """
        g = torch.tanh(self.V(h))  # (B, N, L)
        if self.U is not None:
            g = g * torch.sigmoid(self.U(h))
        s = self.w(self.drop(g)).transpose(1, 2)  # (B, H, N)
        a = masked_softmax(s, mask[:, None, :])  # (B, H, N)
        z = torch.einsum("bhn,bnm->bhm", a, h)  # (B, H, M)
        return z, a
