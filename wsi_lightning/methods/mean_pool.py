"""Mean pooling baseline: embed every instance, average over the bag, classify.

The simplest MIL aggregator (e.g. the "mean" baseline of Ilse et al., 2018): each tile
counts equally, so a small lesion among thousands of normal tiles barely moves the mean.

Deviations from paper:
    - None: a baseline, not a paper method. Embedding Linear-ReLU-Dropout then a masked mean.
"""

from __future__ import annotations

from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, instance_mlp
from wsi_lightning.registry import METHODS


class MeanPoolNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}.
        embed_dim: instance embedding size.
        dropout: dropout after the embedding.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 256,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = instance_mlp(in_dim, embed_dim, dropout)
        self.head = MultiHead(embed_dim, num_classes)

    def forward(self, bag: Bag) -> MILOutput:
        h = self.embed(bag.features)  # (B, N, M)
        m = bag.mask.unsqueeze(-1).to(h.dtype)  # (B, N, 1)
        z = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, M)
        return MILOutput(logits=self.head(z))


@METHODS.register("mean_pool")
class MeanPool(MILModule):
    Net = MeanPoolNet
