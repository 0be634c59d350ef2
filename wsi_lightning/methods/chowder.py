"""CHOWDER (Courtiol et al., 2018) as used by the piece-wise interpretability study
(Pirovano et al., iMIMIC 2020).

Piece-wise form (``docs/methods.md`` 5.1): tile scorer ``s_ij = w^T d_ij + b`` (a 1x1 convolution
over the tile features), MinMax aggregator keeping the R largest and R smallest scores of the
slide, sorted (descriptor ``D_i`` of size 2R), and a 200/100 decision MLP.

Deviations from paper:
    - Training settings are not given by the interpretability paper (docs/methods.md register item 25): we use
      CHOWDER-paper-style defaults, an L2 penalty on the tile scorer's weights (``scorer_l2``,
      returned as the ``l2_scorer`` auxiliary loss), sigmoid MLP activations and dropout 0.5.
    - Softmax head(s) with cross-entropy instead of a single sigmoid output (same model for
      two classes; also serves multiclass / multi-tag).
    - Padded tiles never enter the top / bottom R: they are masked with -inf / +inf. A slide
      with fewer than R tiles repeats its lowest top score (and highest bottom score) to fill
      the R slots, so the descriptor never contains padding.
    - ``scorer_hidden`` (default null = the paper's linear scorer) adds one hidden layer, like
      Owkin's public reimplementation's 128-unit tile MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, decision_mlp
from wsi_lightning.registry import METHODS


def minmax_scores(s: torch.Tensor, mask: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CHOWDER's MinMax layer.

    Args:
        s: (B, N) tile scores.
        mask: (B, N) bool, True for real tiles.
        r: how many top and bottom scores to keep.

    Returns:
        descriptor: (B, 2R) = [top R descending, bottom R ascending];
        index: (B, 2R) tile index of each descriptor entry.
    """
    k = min(r, s.shape[1])
    top_v, top_i = s.masked_fill(~mask, float("-inf")).topk(k, dim=1)  # (B, k)
    bot_v, bot_i = s.masked_fill(~mask, float("inf")).topk(k, dim=1, largest=False)  # (B, k)
    n_valid = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    slot = torch.arange(k, device=s.device)[None]  # (1, k)
    last = (n_valid - 1).clamp(max=k - 1)  # index of the last valid slot
    fill = slot >= n_valid  # slots beyond the slide's tile count
    top_i = torch.where(fill, top_i.gather(1, last), top_i)
    bot_i = torch.where(fill, bot_i.gather(1, last), bot_i)
    if k < r:  # fewer tiles than R in the whole batch: repeat the last slot
        top_i = torch.cat([top_i, top_i[:, -1:].expand(-1, r - k)], 1)
        bot_i = torch.cat([bot_i, bot_i[:, -1:].expand(-1, r - k)], 1)
    index = torch.cat([top_i, bot_i], 1)  # (B, 2R)
    return s.gather(1, index), index


class ChowderNet(nn.Module):
    """Args:
        in_dim: tile feature size D.
        num_classes: {target: C}.
        r: number of top and bottom tile scores kept (R = 5 in the paper).
        mlp_hidden: decision MLP sizes.
        dropout: MLP dropout.
        scorer_l2: weight of the L2 penalty on the tile scorer's weights. It is in the features'
            units (0.5 was sized for ResNet-50 features): on features that barely vary from tile
            to tile (the demo's random ``demo_cnn``) it flattens the scores and every output stays
            near 0.5, so standardise them (``data.standardize``), as the demo config does.
        scorer_hidden: optional hidden layer of the tile scorer (null = linear, the paper).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], r: int = 5,
                 mlp_hidden: tuple[int, ...] = (200, 100), dropout: float = 0.5,
                 scorer_l2: float = 0.5, scorer_hidden: int | None = None) -> None:
        super().__init__()
        self.r, self.scorer_l2 = r, scorer_l2
        if scorer_hidden:
            self.scorer = nn.Sequential(nn.Linear(in_dim, scorer_hidden), nn.Sigmoid(),
                                        nn.Linear(scorer_hidden, 1))
        else:
            self.scorer = nn.Linear(in_dim, 1)  # the 1x1 convolution
        self.mlp = decision_mlp(2 * r, tuple(mlp_hidden), "sigmoid", dropout)
        self.head = MultiHead(tuple(mlp_hidden)[-1], num_classes)

    # piece-wise interface used by wsi_lightning.analysis.interpret (feature attribution)
    def tile_logits(self, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N) scores s_ij (CHOWDER's scores are not normalised)."""
        return self.scorer(d).squeeze(-1)

    def tile_scores(self, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.tile_logits(d, mask)

    def aggregate(self, s: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) scores -> descriptor (B, 2R) and the tile index of each entry (B, 2R)."""
        return minmax_scores(s, mask, self.r)

    def classify(self, desc: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.mlp(desc))

    def forward(self, bag: Bag) -> MILOutput:
        s = self.tile_scores(bag.features, bag.mask)  # (B, N)
        desc, index = self.aggregate(s, bag.features, bag.mask)  # (B, 2R)
        first = self.scorer if isinstance(self.scorer, nn.Linear) else self.scorer[0]
        aux = {"l2_scorer": self.scorer_l2 * first.weight.pow(2).sum()} if self.scorer_l2 else {}
        return MILOutput(logits=self.classify(desc), aux_losses=aux, tile_scores=s.masked_fill(~bag.mask, 0.0),
                         extras={"descriptor": desc, "descriptor_tiles": index})


@METHODS.register("chowder")
class Chowder(MILModule):
    Net = ChowderNet
