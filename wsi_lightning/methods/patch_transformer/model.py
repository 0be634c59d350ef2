"""Patch Transformer with Multi-Tag Attention (Li, Nguyen, Liao, Wilder, Cheng and Luo, "Patch
Transformer for multi-tagging whole slide histopathology images", MICCAI 2019; docs/methods.md §1).

Every slide carries K single-label tags (stain, species, organ): multi-task multi-class
classification with one softmax head per tag and the loss ``sum_k lambda_k CE_k`` (MILModule's
task loss; ``loss.tag_weights`` are the lambda_k, 1 in the paper). The net takes patch features
``V (B, N, D)``: the PT module (:class:`~wsi_lightning.methods.patch_transformer.block.PatchTransformation`,
Eq. 1) turns them into ``V'`` without mixing patches, then Multi-Tag Attention (Eq. 3) pools
``V'`` once per tag and classifies each tag from its own slide vector.

Table 2 rows are switches, not classes: ``heads`` (h; 0 = no PT module, the "MTA" row), ``mta``
(false = one readout for every tag, "PT-1head"), ``attention`` (``sdpa`` = "PT-3head(SDPA)-MTA").
``MILOutput.attention`` is the per-tag MTA attention ``(B, T, N)`` (tags in ``data.tag_cols``
order: the attention logger's map k is tag k), or the readout's ``(B, N)`` without MTA;
``extras["pt_attention"]`` holds the PT heads' weights ``(B, h, N)``.

Deviations from paper (register items 1-5 of docs/methods.md §8, resolved here):
    - Per-head parameters: each PT head has its own ``U_j, w_j`` as the paper indexes them (the
      public third-party port shares one attention module across heads, making them equal).
    - D' (attention hidden size, item 1) is ``attn_dim``, default 128 (Ilse et al.); 512 is the
      third-party choice. PT heads and MTA tags use the same D'.
    - Eq. 3's ``v'_m in R^{D'}`` / ``W_k in R^{D' x D_k}`` is read as a typo (item 2): V' keeps the
      feature size D, as Eq. 1 makes it, and W_k is D x C_k.
    - Biases: ``U_j`` and ``W`` have biases, the score vectors ``w_j`` none (a constant under
      the softmax); the paper writes none.
    - PT-1head without MTA (item 4): ``readout=attention`` (default) is one Ilse attention pool
      shared by every tag followed by one linear head per tag; ``readout=mean`` is a masked mean.
    - ``pt_norm`` (not in the paper): ``softmax`` is Eq. 1 exactly; ``count`` multiplies the
      PT weights by the number of valid patches, so training on M = 32 sampled patches and
      testing on all tiles of a slide (feature-store path, test-time selection unspecified,
      item 3) see the same scale. With M fixed it only rescales W (equivalent models).
    - SDPA ablation: each head has its own query/key projections of size ``attn_dim``; values
      are the patch features themselves and W is the output projection, so only the attention
      changes between the ``ilse`` and ``sdpa`` rows (the paper does not detail its SDPA).
    - Features: the paper fine-tunes ResNet-50 end to end on M = 32 random 224 px patches per
      visit (item 5: 1 slide per step). Here the net takes any ``(B, N, D)`` features; on a
      feature store ``data.max_bag_size: 32`` reproduces the per-visit sampling in training.
      ``embed_dim`` (default null = none, as the paper) adds a Linear-ReLU projection first.
"""

from __future__ import annotations

from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.methods.patch_transformer.block import (
    ATTENTIONS,
    MultiTagAttention,
    PatchTransformation,
)
from wsi_lightning.nn import AttentionPool, MultiHead
from wsi_lightning.registry import METHODS

READOUTS = ("attention", "mean")


class PatchTransformerNet(nn.Module):
    """Args:
        in_dim: patch feature size D.
        num_classes: {tag: C_k}.
        heads: PT heads h (3 = the paper's best); 0 drops the PT module (V' = V, the MTA row).
        mta: multi-tag attention (one attention per tag); false = ``readout`` for every tag.
        attention: PT attention, ``ilse`` (the paper) or ``sdpa`` (the Table 2 ablation).
        attn_dim: attention hidden size D' (PT heads and MTA).
        pt_norm: ``softmax`` (Eq. 1) or ``count`` (N x softmax, bag-size invariant).
        readout: without MTA: ``attention`` (one shared Ilse pool) or ``mean``.
        embed_dim: optional Linear-ReLU projection of the features before the PT module.
        dropout: dropout on the (projected) patch features.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], heads: int = 3, mta: bool = True,
                 attention: str = "ilse", attn_dim: int = 128, pt_norm: str = "softmax",
                 readout: str = "attention", embed_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"patch_transformer: method.attention={attention!r}; expected one of {list(ATTENTIONS)}")
        if readout not in READOUTS:
            raise ValueError(f"patch_transformer: method.readout={readout!r}; expected one of {list(READOUTS)}")
        if heads < 0:
            raise ValueError(f"patch_transformer: method.heads={heads}; expected >= 0 (0 = no PT module)")
        d = embed_dim or in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU()) if embed_dim else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.pt = PatchTransformation(d, heads, attn_dim, attention, pt_norm) if heads else None
        self.mta = MultiTagAttention(d, num_classes, attn_dim) if mta else None
        self.pool = AttentionPool(d, attn_dim) if not mta and readout == "attention" else None
        self.head = MultiHead(d, num_classes) if not mta else None

    def forward(self, bag: Bag) -> MILOutput:
        mask = bag.mask  # (B, N)
        v = self.drop(self.embed(bag.features))  # (B, N, D)
        extras = {}
        if self.pt is not None:
            v, a_pt = self.pt(v, mask)  # (B, N, D), (B, h, N) or None
            if a_pt is not None:
                extras["pt_attention"] = a_pt
        if self.mta is not None:
            logits, a = self.mta(v, mask)  # {tag: (B, C_k)}, (B, T, N)
            return MILOutput(logits=logits, attention=a, extras=extras)
        if self.pool is not None:
            z, a = self.pool(v, mask)  # (B, 1, D), (B, 1, N)
            return MILOutput(logits=self.head(z[:, 0]), attention=a[:, 0], extras=extras)
        m = mask[..., None].to(v.dtype)  # (B, N, 1)
        z = (v * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        return MILOutput(logits=self.head(z), extras=extras)


@METHODS.register("patch_transformer")
class PatchTransformer(MILModule):
    Net = PatchTransformerNet
