"""Attention-based deep MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated attention.

Instances (precomputed tile features) are embedded by a Linear-ReLU layer, pooled with
attention ``a = softmax_N(w^T tanh(V h))`` (gated: ``tanh(V h) * sigmoid(U h)``), and the
pooled embedding ``z = sum_n a_n h_n`` is classified.

Deviations from paper:
    - The classifier is a softmax head per target trained with cross-entropy instead of one
      sigmoid output with a clamped Bernoulli NLL; for two classes both model the same
      posterior, and the softmax form also serves multiclass and multi-tag tasks.
    - Embedding size defaults to M = 256 (the paper's MNIST-bags setting is M = 500 on
      28x28 images; WSI tile features are already high-level), attention size L = 128 as
      in the paper. Both are config keys (`method.embed_dim`, `method.attn_dim`).
    - Dropout (default 0.25) after the embedding, as CLAM does on WSI features.
"""

from __future__ import annotations

from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import AttentionPool, MultiHead, instance_mlp
from wsi_lightning.registry import METHODS


class ABMILNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}.
        embed_dim: instance embedding size M.
        attn_dim: attention hidden size L.
        gated: gated attention.
        dropout: dropout after the embedding.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 256,
                 attn_dim: int = 128, gated: bool = False, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = instance_mlp(in_dim, embed_dim, dropout)
        self.pool = AttentionPool(embed_dim, attn_dim, gated=gated)
        self.head = MultiHead(embed_dim, num_classes)

    def forward(self, bag: Bag) -> MILOutput:
        h = self.embed(bag.features)  # (B, N, M)
        z, a = self.pool(h, bag.mask)  # (B, 1, M), (B, 1, N)
        return MILOutput(logits=self.head(z[:, 0]), attention=a[:, 0])


@METHODS.register("abmil")
class ABMIL(MILModule):
    Net = ABMILNet
