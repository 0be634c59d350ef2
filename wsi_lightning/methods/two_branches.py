"""TwoBranches: attention MIL plus a patch-level branch (the "TwoBranches" baseline of Li et al.,
"Patch Transformer for multi-tagging whole slide histopathology images", MICCAI 2019, Table 2;
docs/methods.md §1.7).

Slide branch: DeepMIL (Ilse attention over the embedded patches, one softmax head per tag).
Patch branch: one linear softmax head per tag on every patch embedding; each patch inherits
its slide's tags, and the patch cross-entropy (mean over the valid patches of the batch, summed
over tags) is returned as ``aux_losses["patch_ce"]``, so the loss is slide CE + patch CE. The
slide branch alone gives the prediction.

Deviations from paper:
    - The paper gives no architecture details beyond "an extra patch-level branch": both
      branches share a Linear-ReLU patch embedding (``embed_dim``), as DeepMIL's, and the patch
      heads are linear. ``patch_weight`` (1 in the paper) weights the patch CE; slides with an
      unknown tag (-1) give no patch loss for that tag.
    - The patch CE is computed whenever the bag has labels (also at validation / test, where it
      is only logged); a bag without labels (prediction) has no auxiliary loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import AttentionPool, MultiHead, instance_mlp
from wsi_lightning.registry import METHODS


def inherited_patch_ce(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                       mask: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy of patch predictions against their slide's tags.

    Args:
        logits: {tag: (B, N, C)} patch logits.
        labels: {tag: (B,)} slide labels, -1 where unknown.
        mask: (B, N) bool valid patches.

    Returns:
        Sum over tags of the mean CE over valid, labelled patches; None when no tag has labels.
    """
    terms = []
    for t, lg in logits.items():
        if t not in labels:
            continue
        y = labels[t].to(lg.device)[:, None].expand_as(mask)  # (B, N) inherited tag
        y = y.masked_fill(~mask, -1)
        if bool((y >= 0).any()):
            terms.append(F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(), ignore_index=-1))
    return torch.stack(terms).sum() if terms else None


class TwoBranchesNet(nn.Module):
    """Args:
        in_dim: patch feature size D.
        num_classes: {tag: C}.
        embed_dim: shared patch embedding size.
        attn_dim: attention hidden size.
        dropout: dropout after the embedding.
        patch_weight: weight of the patch-branch CE.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 512,
                 attn_dim: int = 128, dropout: float = 0.0, patch_weight: float = 1.0) -> None:
        super().__init__()
        self.embed = instance_mlp(in_dim, embed_dim, dropout)
        self.pool = AttentionPool(embed_dim, attn_dim)
        self.head = MultiHead(embed_dim, num_classes)
        self.patch_head = MultiHead(embed_dim, num_classes)
        self.patch_weight = patch_weight

    def forward(self, bag: Bag) -> MILOutput:
        h = self.embed(bag.features)  # (B, N, M)
        z, a = self.pool(h, bag.mask)  # (B, 1, M), (B, 1, N)
        patch_logits = self.patch_head(h)  # {tag: (B, N, C)}
        aux = {}
        ce = inherited_patch_ce(patch_logits, bag.labels, bag.mask) if bag.labels else None
        if ce is not None:
            aux["patch_ce"] = self.patch_weight * ce
        return MILOutput(logits=self.head(z[:, 0]), attention=a[:, 0], aux_losses=aux,
                         extras={"instance_logits": patch_logits})


@METHODS.register("two_branches")
class TwoBranches(MILModule):
    Net = TwoBranchesNet
    class_weighted = False  # the patch branch's CE is the net's own
