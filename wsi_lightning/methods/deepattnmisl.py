"""DeepAttnMISL as used by CS-MIL (Yao et al., MedIA 2020; Deng et al., 2022 backbone).

Instances are embedded by the MI-FCN (a 1x1 convolution, i.e. a shared Linear D -> 64, ReLU),
pooled with Ilse attention (``e_i = w^T tanh(V F_i)``, V: 64 -> 32) over every instance of the
bag, and the bag embedding is classified by Linear 64 -> 32, ReLU, Dropout 0.5 and the output
layer (``docs/methods.md`` 3.6 without the cross-scale step).

Deviations from paper:
    - Instances are patches, not phenotype clusters: as in CS-MIL's code, clusters only
      stratify the sampling of a bag (the original survival DeepAttnMISL averages each
      cluster into one instance).
    - Softmax head(s) with cross-entropy instead of a clamped Bernoulli NLL (same posterior for
      two classes).
    - On multi-scale data this single-scale model reads one scale (``data.multiscale.mode``),
      or all scales as independent instances, as the CS-MIL baselines do.
"""

from __future__ import annotations

from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import AttentionPool, MultiHead, instance_mlp
from wsi_lightning.registry import METHODS


def misl_head(embed_dim: int, hidden: int, dropout: float, num_classes: dict[str, int]) -> nn.Module:
    """DeepAttnMISL's classifier: Linear -> ReLU -> Dropout -> one output layer per target."""
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         MultiHead(hidden, num_classes))


class DeepAttnMISLNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}.
        embed_dim: MI-FCN output size (64).
        attn_dim: attention hidden size (32).
        head_dim: classifier hidden size (32).
        dropout: classifier dropout (0.5).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 64, attn_dim: int = 32,
                 head_dim: int = 32, dropout: float = 0.5) -> None:
        super().__init__()
        self.embed = instance_mlp(in_dim, embed_dim)
        self.pool = AttentionPool(embed_dim, attn_dim)
        self.head = misl_head(embed_dim, head_dim, dropout, num_classes)

    def forward(self, bag: Bag) -> MILOutput:
        f = self.embed(bag.features)  # (B, N, 64)
        z, a = self.pool(f, bag.mask)  # (B, 1, 64), (B, 1, N)
        return MILOutput(logits=self.head(z[:, 0]), attention=a[:, 0])


@METHODS.register("deepattnmisl")
class DeepAttnMISL(MILModule):
    Net = DeepAttnMISLNet
