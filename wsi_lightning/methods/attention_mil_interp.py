"""Attention MIL as trained in the piece-wise interpretability study (Pirovano et al., 2020),
after Ilse et al. (2018).

Piece-wise form (``docs/methods.md`` 5.2): the tile scorer is an attention module, two 1x1
convolutions (128 channels, then 1) with a softmax over the slide's tiles, giving normalised
scores ``s_ij``; the aggregator is ``D_i = sum_j s_ij d_ij`` on the raw tile features (so the
descriptor has the feature size, M = D); the decision is the same 200/100 MLP as CHOWDER.

Deviations from paper:
    - The activation between the two attention convolutions is not stated; tanh, as in Ilse
      et al. (``attn_activation``).
    - Training settings are not given (docs/methods.md register item 25): Adam, sigmoid MLP with dropout 0.5,
      as for CHOWDER.
    - Softmax head(s) with cross-entropy instead of one sigmoid output.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, decision_mlp, masked_softmax
from wsi_lightning.registry import METHODS


class AttentionMILInterpNet(nn.Module):
    """Args:
        in_dim: tile feature size D.
        num_classes: {target: C}.
        attn_dim: channels of the first attention convolution (128).
        attn_activation: ``tanh`` (Ilse) or ``relu``.
        mlp_hidden: decision MLP sizes.
        dropout: MLP dropout.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], attn_dim: int = 128,
                 attn_activation: str = "tanh", mlp_hidden: tuple[int, ...] = (200, 100),
                 dropout: float = 0.5) -> None:
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if attn_activation not in acts:
            raise ValueError(f"attn_activation '{attn_activation}'; expected one of {sorted(acts)}")
        self.attention = nn.Sequential(nn.Linear(in_dim, attn_dim), acts[attn_activation](),
                                       nn.Linear(attn_dim, 1))
        self.mlp = decision_mlp(in_dim, tuple(mlp_hidden), "sigmoid", dropout)
        self.head = MultiHead(tuple(mlp_hidden)[-1], num_classes)

    normalised_scores = True  # tile_scores = softmax over the slide of tile_logits

    # piece-wise interface used by wsi_lightning.analysis.interpret (feature attribution)
    def tile_logits(self, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N) attention logits (each from its own tile)."""
        return self.attention(d).squeeze(-1)

    def tile_scores(self, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N) attention, summing to 1 over the slide's tiles."""
        return masked_softmax(self.tile_logits(d, mask), mask)

    def aggregate(self, s: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        """D_i = sum_j s_ij d_ij: (B, N), (B, N, D) -> (B, D)."""
        return torch.einsum("bn,bnd->bd", s, d), None

    def classify(self, desc: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.mlp(desc))

    def forward(self, bag: Bag) -> MILOutput:
        s = self.tile_scores(bag.features, bag.mask)  # (B, N)
        desc, _ = self.aggregate(s, bag.features, bag.mask)  # (B, D)
        return MILOutput(logits=self.classify(desc), attention=s, tile_scores=s, extras={"descriptor": desc})


@METHODS.register("attention_mil_interp")
class AttentionMILInterp(MILModule):
    Net = AttentionMILInterpNet
