"""Integrated Attention Transformer (IAT) of HAG-MIL (Xiong et al., IJCAI 2023), batched.

One IATModel scores one resolution level. It stacks Integrated Attention Modules (IAMBlocks):
each embeds the tokens, runs one pre-norm Nyström self-attention layer (scaled residual, no
feed-forward) and pools the tokens with CLAM's gated attention into a block vector. The block
vectors are combined by a learned ``Linear(n_blocks -> 1)`` across blocks and classified. The
last block's attention drives HAG-MIL's selection of patches at the next level and CLAM's
instance-clustering loss (top-k / bottom-k instances, one binary classifier per class, smooth
top-1 SVM).

Deviations from the official code (which runs one slide at a time):
    - Batched over B bags with a (B, N) mask; a padded batch gives each bag its lone result
      (Nyström masking as documented in :mod:`wsi_lightning.nn.nystrom`).
    - Bags with fewer than k valid instances use k = n for the instance loss (the original
      ``topk`` would fail); top and bottom sets may then overlap, as they do for n < 2k there.
    - The instance loss of a batch is the mean over bags with a known label (-1 = unknown).
    - Layers keep PyTorch's default initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsi_lightning.nn.attention import masked_softmax
from wsi_lightning.nn.nystrom import NystromAttention
from wsi_lightning.nn.residual import ScaledResidual
from wsi_lightning.nn.smooth_svm import SmoothTop1SVM


@dataclass
class IAMOutput:
    """One block's outputs: tokens h (B, N, d_out); attention_raw (B, N), -inf at padding;
    attention (B, N), 0 at padding; s (B, final_dim) block vector; u (B, N, attn_dim) instance
    embeddings."""

    h: torch.Tensor
    attention_raw: torch.Tensor
    attention: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor


@dataclass
class IATOutput:
    """IATModel outputs.

    Attributes:
        logits: (B, C).
        attention_raw: (B, N) last block's pre-softmax scores, -inf at padding.
        attention: (B, N) last block's softmax, summing to 1 over valid instances.
        instance_loss: () mean instance-clustering loss; None when no labels were given.
        embedding: (B, final_dim) combined slide vector fed to the classifier.
        block_attention: (B, n_blocks, N) every block's softmax attention, 0 at padding.
    """

    logits: torch.Tensor
    attention_raw: torch.Tensor
    attention: torch.Tensor
    instance_loss: torch.Tensor | None
    embedding: torch.Tensor
    block_attention: torch.Tensor | None = None


class GatedScore(nn.Module):
    """CLAM's attention network: ``W_c[Dropout(tanh(W_a u)) ⊙ Dropout(σ(W_b u))]`` (gated) or
    ``W_c Dropout(tanh(W_a u))``: (B, N, L) -> (B, N) raw scores."""

    def __init__(self, dim: int = 512, hidden: int = 256, dropout: float = 0.25,
                 gated: bool = True) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = (nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
                  if gated else None)
        self.c = nn.Linear(hidden, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        g = self.a(u)  # (B, N, hidden)
        if self.b is not None:
            g = g * self.b(u)
        return self.c(g).squeeze(-1)  # (B, N)


class IAMBlock(nn.Module):
    """Integrated Attention Module (docs/methods.md §2.2).

    Args:
        d_in, d_out: token sizes in and out.
        final_dim: size of the block vector s.
        attn_dim: size of the instance embedding u (512).
        gate_dim: hidden size of the gated attention (256).
        dropout: dropout on u and in the gated attention (0.25).
        gated: gated attention (True in HAG-MIL).
        heads: Nyström heads (dim_head = d_out / heads).
        num_landmarks: Nyström landmarks; None = d_out // 2.
        pinv_iterations, residual_conv, conv_kernel: see :class:`NystromAttention`.
        attn_dropout: dropout of the Nyström output projection (0.3).
        admin: Admin-scaled residual (ω for ``res_layers`` layers); False = plain residual.
        res_layers: number of residual layers ω is computed for (8 in HAG-MIL).
    """

    def __init__(self, d_in: int, d_out: int, final_dim: int = 1024, attn_dim: int = 512,
                 gate_dim: int = 256, dropout: float = 0.25, gated: bool = True, heads: int = 8,
                 num_landmarks: int | None = None, pinv_iterations: int = 6,
                 residual_conv: bool = True, conv_kernel: int = 33, attn_dropout: float = 0.3,
                 admin: bool = True, res_layers: int = 8) -> None:
        super().__init__()
        if d_out % heads:
            raise ValueError(f"IAMBlock: d_out={d_out} must be divisible by heads={heads}")
        self.embed = nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU())
        self.attn_norm = nn.LayerNorm(d_out)
        self.attn = NystromAttention(
            d_out, heads=heads, dim_head=d_out // heads,
            num_landmarks=num_landmarks or max(d_out // 2, 1), pinv_iterations=pinv_iterations,
            residual_conv=residual_conv, conv_kernel=conv_kernel, dropout=attn_dropout)
        self.residual = ScaledResidual(res_layers, plain=not admin)
        self.norm = nn.LayerNorm(d_out)  # LN_b: on tokens before scoring and on the pooled z
        self.inst = nn.Sequential(nn.Linear(d_out, attn_dim), nn.GELU(), nn.Dropout(dropout))
        self.score = GatedScore(attn_dim, gate_dim, dropout, gated)
        self.to_final = nn.Sequential(nn.Linear(d_out, final_dim), nn.LayerNorm(final_dim),
                                      nn.GELU())

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> IAMOutput:
        """h: (B, N, d_in) tokens; mask: (B, N) bool."""
        valid = mask[..., None]  # (B, N, 1)
        h = self.embed(h)  # (B, N, d_out)
        h = self.residual(h, self.attn(self.attn_norm(h), mask)).masked_fill(~valid, 0.0)
        u = self.inst(self.norm(h))  # (B, N, attn_dim)
        a_raw = self.score(u).masked_fill(~mask, float("-inf"))  # (B, N)
        a = masked_softmax(a_raw, mask)  # (B, N)
        z = self.norm(torch.einsum("bn,bnd->bd", a, h))  # (B, d_out) pooled un-normalised h
        return IAMOutput(h, a_raw, a, self.to_final(z), u)


def top_bottom_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the min(k, n) highest and lowest of ``scores`` (n,): two (min(k, n),)."""
    k = min(k, scores.shape[0])
    return torch.topk(scores, k).indices, torch.topk(-scores, k).indices


class IATModel(nn.Module):
    """Integrated Attention Transformer for one resolution level (docs/methods.md §2.2).

    Args:
        feat_in: instance feature size D.
        hidden_dims: token size after each IAMBlock (one block per entry).
        final_dim: size of the block vectors and the slide vector.
        n_classes: C.
        dropout: dropout of u and of the gated attention.
        k_sample: k of the instance loss (top-k and bottom-k instances).
        gated: gated attention.
        admin: Admin-scaled residuals (False = plain).
        attn_dim, gate_dim, heads, num_landmarks, pinv_iterations, residual_conv, conv_kernel,
            attn_dropout, res_layers: see :class:`IAMBlock`.
        inst_loss: ``"svm"`` (smooth top-1 SVM, α = ``inst_alpha``, τ = ``inst_tau``) or ``"ce"``.
    """

    def __init__(self, feat_in: int = 1024, hidden_dims: tuple[int, ...] = (1024, 1536, 512, 1024),
                 final_dim: int = 1024, n_classes: int = 2, dropout: float = 0.25,
                 k_sample: int = 8, gated: bool = True, admin: bool = True, attn_dim: int = 512,
                 gate_dim: int = 256, heads: int = 8, num_landmarks: int | None = None,
                 pinv_iterations: int = 6, residual_conv: bool = True, conv_kernel: int = 33,
                 attn_dropout: float = 0.3, res_layers: int = 8, inst_loss: str = "svm",
                 inst_alpha: float = 1.0, inst_tau: float = 1.0) -> None:
        super().__init__()
        if inst_loss not in ("svm", "ce"):
            raise ValueError(f"IATModel: inst_loss '{inst_loss}' unknown; expected 'svm' or 'ce'")
        dims = (feat_in, *hidden_dims)
        self.blocks = nn.ModuleList(
            IAMBlock(d_in, d_out, final_dim=final_dim, attn_dim=attn_dim, gate_dim=gate_dim,
                     dropout=dropout, gated=gated, heads=heads, num_landmarks=num_landmarks,
                     pinv_iterations=pinv_iterations, residual_conv=residual_conv,
                     conv_kernel=conv_kernel, attn_dropout=attn_dropout, admin=admin,
                     res_layers=res_layers)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
        self.combine = nn.Linear(len(hidden_dims), 1)  # weighted sum of block vectors + bias
        self.classifier = nn.Linear(final_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(attn_dim, 2) for _ in range(n_classes))
        self.k_sample = k_sample
        self.inst_loss_fn = (SmoothTop1SVM(inst_alpha, inst_tau) if inst_loss == "svm"
                             else nn.CrossEntropyLoss())

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> IATOutput:
        """
        Args:
            h: (B, N, D) instance features.
            mask: (B, N) bool, True for valid instances; None = all valid.
            labels: (B,) int64 bag labels (-1 = unknown) for the instance loss, or None.
        """
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        vectors, maps = [], []
        for block in self.blocks:
            out = block(h, mask)
            h = out.h
            vectors.append(out.s)
            maps.append(out.attention)
        s = torch.stack(vectors, dim=-1)  # (B, final_dim, n_blocks)
        z = self.combine(s).squeeze(-1)  # (B, final_dim)
        inst = None
        if labels is not None:
            inst = self.instance_loss(out.attention_raw, out.u, mask, labels)
        return IATOutput(self.classifier(z), out.attention_raw, out.attention, inst, z, torch.stack(maps, 1))

    def instance_loss(self, scores: torch.Tensor, u: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """CLAM in-class instance clustering (``subtyping=False``), averaged over labelled bags.

        For bag b with label y, the instances with the k highest / lowest ``scores`` among its
        valid ones get targets 1 / 0 for the instance classifier of class y.

        Args:
            scores: (B, N) attention (raw or softmax: only the order matters).
            u: (B, N, L) instance embeddings.
            mask: (B, N) bool.
            labels: (B,) int64, -1 = unknown.

        Returns:
            () loss; 0 when no bag has a label and a valid instance.
        """
        losses = []
        for b, y in enumerate(labels.tolist()):
            valid = mask[b].nonzero().squeeze(1)  # (n_b,)
            if y < 0 or valid.numel() == 0:
                continue
            top, bottom = top_bottom_k(scores[b, valid], self.k_sample)  # (k,), (k,)
            idx = valid[torch.cat([top, bottom])]  # (2k,) positions in the padded bag
            targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)])  # (2k,)
            losses.append(self.inst_loss_fn(self.instance_classifiers[y](u[b, idx]), targets))
        if not losses:
            return u.new_zeros(())
        return torch.stack(losses).mean()
