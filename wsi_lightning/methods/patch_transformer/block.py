"""Patch Transformer blocks (Li et al., MICCAI 2019): the Patch Transformation (PT) module and
Multi-Tag Attention (MTA).

Both work on instance features ``(B, N, D)`` with a ``(B, N)`` mask, whatever produced them: a
feature store (every tile of a slide) or a CNN run on M random patches per visit (the paper:
M = 32, ResNet-50 pooled conv5_3, D = 2048).

* :class:`SeparateAttention`: ``n`` Ilse attention maps ``softmax_N(w_j^T tanh(U_j^T v))``, each
  with its OWN ``U_j, w_j`` (one PT head or one tag each). A public third-party port reuses one
  attention module for every head, which makes the heads identical; here they never share.
* :class:`PatchTransformation`: Eq. 1, ``V' = ReLU(V + [f_1, ..., f_h] W)`` with
  ``f_j = a_j ⊙ V`` (Ilse weights scale each patch's features: no patch is mixed into another)
  or, for the Table 2 ablation ``attention="sdpa"``, ``f_j = softmax(Q_j K_j^T / sqrt(d)) V``
  (scaled dot-product self-attention, which mixes patches).
* :class:`MultiTagAttention`: Eq. 3, one attention per tag over V', ``t_k = sum_m a_km v'_m``,
  ``logits_k = W_k^T t_k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.nn.attention import masked_softmax

ATTENTIONS = ("ilse", "sdpa")
PT_NORMS = ("softmax", "count")


class SeparateAttention(nn.Module):
    """``n`` independent Ilse attention maps over the instances of a bag.

    Map j: ``a_j = softmax_N(w_j^T tanh(U_j^T v + b_j))`` with its own ``U_j (D, L)``, ``b_j (L,)``
    and ``w_j (L,)``. The score vector ``w_j`` has no bias (a constant under a softmax).

    Args:
        dim: instance feature size D.
        hidden: attention hidden size L (the paper's D'; 128 as in Ilse et al.).
        n: number of maps (PT heads h, or MTA tags T).
    """

    def __init__(self, dim: int, hidden: int, n: int) -> None:
        super().__init__()
        if n < 1 or hidden < 1:
            raise ValueError(f"SeparateAttention: n={n}, hidden={hidden}; expected integers >= 1")
        self.U = nn.Parameter(torch.empty(n, dim, hidden))
        self.b = nn.Parameter(torch.empty(n, hidden))
        self.w = nn.Parameter(torch.empty(n, hidden))
        for p, fan_in in ((self.U, dim), (self.b, dim), (self.w, hidden)):  # nn.Linear's init
            nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def scores(self, v: torch.Tensor) -> torch.Tensor:
        """v: (B, N, D) -> unnormalised scores (B, n, N)."""
        g = torch.tanh(torch.einsum("bnd,jdl->bjnl", v, self.U) + self.b[:, None])  # (B, n, N, L)
        return torch.einsum("bjnl,jl->bjn", g, self.w)  # (B, n, N)

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            v: (B, N, D) instance features.
            mask: (B, N) bool, True for valid instances.

        Returns:
            (B, n, N) attention, summing to 1 over the valid instances of each map; 0 at padding.
        """
        return masked_softmax(self.scores(v), mask[:, None, :])  # (B, n, N)


class PatchTransformation(nn.Module):
    """The PT module (Eq. 1): ``V' = ReLU(V + [f_1, ..., f_h] W)``, ``W (hD, D)``.

    Args:
        dim: instance feature size D (V' has the same size).
        heads: number of heads h (3 in the paper's best model).
        hidden: attention hidden size D' (``ilse``) or per-head query/key size (``sdpa``).
        attention: ``ilse`` (the paper: ``f_j = a_j ⊙ V``, patches scaled, never mixed) or
            ``sdpa`` (ablation: ``f_j = softmax(Q_j K_j^T / sqrt(hidden)) V`` over the valid
            patches; values are V itself, so W is the output projection in both cases).
        norm: ``ilse`` only. ``softmax`` (Eq. 1): the weights sum to 1 over the bag, so each
            ``f_j`` shrinks like 1/N; ``count``: N x softmax (mean weight 1), so a model trained
            on M = 32 patches sees the same scale on a full bag of thousands of tiles.
    """

    def __init__(self, dim: int, heads: int = 3, hidden: int = 128, attention: str = "ilse",
                 norm: str = "softmax") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"PatchTransformation: attention={attention!r}; expected one of {list(ATTENTIONS)}")
        if norm not in PT_NORMS:
            raise ValueError(f"PatchTransformation: norm={norm!r}; expected one of {list(PT_NORMS)}")
        if heads < 1:
            raise ValueError(f"PatchTransformation: heads={heads}; expected >= 1")
        self.heads, self.hidden, self.attention, self.norm = heads, hidden, attention, norm
        if attention == "ilse":
            self.att = SeparateAttention(dim, hidden, heads)
        else:
            self.qk = nn.Linear(dim, 2 * heads * hidden)  # head j's Q_j, K_j are its own slices
        self.W = nn.Linear(heads * dim, dim)

    def head_outputs(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head outputs f_j, stacked: (B, h, N, D), and the Ilse weights (B, h, N) (None for sdpa)."""
        if self.attention == "ilse":
            a = self.att(v, mask)  # (B, h, N)
            if self.norm == "count":
                a = a * mask.sum(1).clamp(min=1)[:, None, None].to(a.dtype)  # (B, h, N), mean 1
            return a[..., None] * v[:, None], a  # (B, h, N, D): patch m scaled by a_jm
        b, n, _ = v.shape
        q, k = self.qk(v).view(b, n, 2, self.heads, self.hidden).permute(2, 0, 3, 1, 4)  # 2 x (B, h, N, d)
        vals = v[:, None].expand(-1, self.heads, -1, -1)  # (B, h, N, D)
        f = F.scaled_dot_product_attention(q, k, vals, attn_mask=mask[:, None, None, :])  # (B, h, N, D)
        return torch.nan_to_num(f, nan=0.0), None  # a bag without valid patch -> zeros

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            v: (B, N, D) patch features.
            mask: (B, N) bool.

        Returns:
            v_out: (B, N, D) transformed patches V' (0 at padding).
            a: (B, h, N) PT attention of each head (``ilse``; None for ``sdpa``).
        """
        f, a = self.head_outputs(v, mask)  # (B, h, N, D)
        b, h, n, d = f.shape
        cat = f.permute(0, 2, 1, 3).reshape(b, n, h * d)  # (B, N, hD) = [f_1, ..., f_h]
        v_out = torch.relu(v + self.W(cat))  # (B, N, D)
        return v_out.masked_fill(~mask[..., None], 0.0), a


class MultiTagAttention(nn.Module):
    """MTA (Eq. 3): per tag k, ``a_k = softmax_N(w_k^T tanh(U_k^T v'))``, ``t_k = sum_m a_km v'_m``
    and ``logits_k = W_k^T t_k`` (one softmax head per tag).

    Args:
        dim: feature size D of V'.
        num_classes: {tag: C_k}, in tag order.
        hidden: attention hidden size D'.
    """

    def __init__(self, dim: int, num_classes: dict[str, int], hidden: int = 128) -> None:
        super().__init__()
        self.tags = list(num_classes)
        self.att = SeparateAttention(dim, hidden, len(self.tags))
        self.heads = nn.ModuleDict({t: nn.Linear(dim, c) for t, c in num_classes.items()})

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """
        Args:
            v: (B, N, D) transformed patches V'.
            mask: (B, N) bool.

        Returns:
            logits: {tag: (B, C_k)}; a: (B, T, N) per-tag attention, tags in ``num_classes`` order.
        """
        a = self.att(v, mask)  # (B, T, N)
        t = torch.einsum("bkn,bnd->bkd", a, v)  # (B, T, D) tag-specific slide vectors
        return {tag: self.heads[tag](t[:, k]) for k, tag in enumerate(self.tags)}, a
