"""Max pooling baseline (mi-Net style): score every instance, take the bag's maximum per class.

Deviations from paper:
    - None: a baseline. Instance scores are per-class logits; the bag logit of each class is
      the maximum over valid instances. The per-instance scores of the first target are
      returned in ``extras["instance_logits"]`` (B, N, C) for inspection.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, instance_mlp
from wsi_lightning.registry import METHODS


class MaxPoolNet(nn.Module):
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
        inst = self.head(h)  # {t: (B, N, C)}
        pad = (~bag.mask).unsqueeze(-1)  # (B, N, 1)
        logits = {t: s.masked_fill(pad, float("-inf")).amax(1) for t, s in inst.items()}  # (B, C)
        logits = {t: torch.nan_to_num(v, neginf=0.0) for t, v in logits.items()}
        first = next(iter(inst.values()))
        return MILOutput(logits=logits, extras={"instance_logits": first})


@METHODS.register("max_pool")
class MaxPool(MILModule):
    Net = MaxPoolNet
