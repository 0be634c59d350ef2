"""CLAM-SB: clustering-constrained attention MIL, single attention branch (Lu et al., "Data-
efficient and weakly supervised computational pathology on whole-slide images", Nat. Biomed. Eng.
2021; docs/methods.md §2.2 and §6.3).

Instances are embedded (``Linear D -> 512, ReLU, Dropout``), scored by gated attention
(``W_c[tanh(W_a h) ⊙ σ(W_b h)]``, 512 -> 256 -> 1), pooled ``z = Σ_n softmax(a)_n h_n`` and
classified. Instance-level clustering: for a bag of class y, the k instances with the highest and
the k with the lowest attention get pseudo-labels 1 and 0 for the binary instance classifier of
class y (one ``Linear 512 -> 2`` per class; ``subtyping=true`` also teaches the other classes'
classifiers that the bag's top-k are negatives). The total loss is
``bag_weight * CE(bag) + inst_weight * L_inst`` (0.7 / 0.3, CLAM's defaults); the instance term
is returned as ``aux_losses["inst"]`` whenever the first target's labels are known (training and
evaluation, like CLAM, where it only changes the logged loss at evaluation).

Deviations from paper:
    - Batched over B padded bags (CLAM runs one slide at a time): padding never enters the
      attention or the top / bottom-k, and the instance loss is the mean over labelled bags.
    - Bags with fewer than k valid instances use k = n (CLAM's ``topk`` would fail); the top and
      bottom sets then overlap, as they already do for n < 2k in CLAM.
    - Several targets (multi-tag, not in the paper): one linear head per target on z, all scaled
      by ``bag_weight``; the instance loss uses the first target's labels.
    - The bag loss is cross-entropy (CLAM's default ``--bag_loss ce``; its smooth-SVM bag loss is
      not offered). The instance loss is the smooth top-1 SVM (α = τ = 1) or cross-entropy.
    - Linear layers get CLAM's initialisation (Xavier-normal weights, zero biases).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, instance_mlp, masked_softmax
from wsi_lightning.nn.iat import GatedScore, top_bottom_k
from wsi_lightning.nn.smooth_svm import SmoothTop1SVM
from wsi_lightning.registry import METHODS

INST_LOSSES = ("svm", "ce")


def clam_instance_loss(scores: torch.Tensor, h: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor, classifiers: nn.ModuleList, loss_fn: nn.Module,
                       k: int, subtyping: bool = False) -> torch.Tensor | None:
    """CLAM's instance-clustering loss, averaged over the bags with a known label.

    For bag b of class y, among its valid instances: the k highest-``scores`` ones get target 1
    and the k lowest target 0 for ``classifiers[y]`` (in-class). With ``subtyping``, the k
    highest also get target 0 for every other class's classifier (out-of-class) and the bag's
    sum over classes is divided by the number of classes, as CLAM does.

    Args:
        scores: (B, N) attention, raw or softmax (only the order matters).
        h: (B, N, M) instance embeddings.
        mask: (B, N) bool, True for valid instances.
        labels: (B,) int64, -1 = unknown.
        classifiers: one ``(..., M) -> (..., 2)`` module per class.
        loss_fn: ``(scores (S, 2), targets (S,)) -> ()`` loss.
        k: instances per side (min(k, n) for small bags).
        subtyping: add CLAM's out-of-class terms.

    Returns:
        () loss, or None when no bag has a label and a valid instance.
    """
    losses = []
    for b, y in enumerate(labels.tolist()):
        valid = mask[b].nonzero().squeeze(1)  # (n_b,) positions of the valid instances
        if y < 0 or valid.numel() == 0:
            continue
        top, bottom = (valid[i] for i in top_bottom_k(scores[b, valid], k))  # (k,), (k,)
        idx = torch.cat([top, bottom])  # (2k,) positions in the padded bag
        targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)])  # (2k,)
        bag_loss = loss_fn(classifiers[y](h[b, idx]), targets)
        if subtyping:
            for c, clf in enumerate(classifiers):
                if c != y:
                    bag_loss = bag_loss + loss_fn(clf(h[b, top]), torch.zeros_like(top))
            bag_loss = bag_loss / len(classifiers)
        losses.append(bag_loss)
    return torch.stack(losses).mean() if losses else None


def clam_init(module: nn.Module) -> None:
    """CLAM's initialisation: Xavier-normal weights and zero biases on every Linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CLAMSBNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}; the first target drives the instance loss.
        embed_dim: instance embedding size (512, CLAM "small").
        attn_dim: gated-attention hidden size (256).
        dropout: dropout after the embedding and in the attention branches (0.25).
        gated: gated attention (CLAM default) or plain tanh attention.
        k_sample: k of the top / bottom-k instances (8).
        inst_loss: ``"svm"`` (smooth top-1 SVM, CLAM default) or ``"ce"``.
        subtyping: CLAM's out-of-class instance terms (off: in-class only).
        bag_weight: weight of the bag cross-entropy (0.7).
        inst_weight: weight of the instance loss (0.3).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 512,
                 attn_dim: int = 256, dropout: float = 0.25, gated: bool = True, k_sample: int = 8,
                 inst_loss: str = "svm", subtyping: bool = False, bag_weight: float = 0.7,
                 inst_weight: float = 0.3) -> None:
        super().__init__()
        if inst_loss not in INST_LOSSES:
            raise ConfigError(f"clam_sb: method.inst_loss={inst_loss!r}; expected one of {list(INST_LOSSES)}")
        if k_sample < 1:
            raise ConfigError(f"clam_sb: method.k_sample={k_sample}; expected an integer >= 1")
        self.target = next(iter(num_classes))
        self.embed = instance_mlp(in_dim, embed_dim, dropout)
        self.score = GatedScore(embed_dim, attn_dim, dropout, gated)
        self.head = MultiHead(embed_dim, num_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(embed_dim, 2) for _ in range(num_classes[self.target]))
        self.inst_loss_fn = SmoothTop1SVM(1.0, 1.0) if inst_loss == "svm" else nn.CrossEntropyLoss()
        self.k_sample, self.subtyping = k_sample, subtyping
        self.bag_weight, self.inst_weight = bag_weight, inst_weight
        clam_init(self)

    def forward(self, bag: Bag) -> MILOutput:
        mask = bag.mask  # (B, N)
        h = self.embed(bag.features).masked_fill(~mask[..., None], 0.0)  # (B, N, M)
        a_raw = self.score(h).masked_fill(~mask, float("-inf"))  # (B, N)
        a = masked_softmax(a_raw, mask)  # (B, N)
        z = torch.einsum("bn,bnm->bm", a, h)  # (B, M)
        aux = {}
        y = bag.labels.get(self.target) if bag.labels else None
        if y is not None:
            inst = clam_instance_loss(a_raw, h, mask, y, self.instance_classifiers,
                                      self.inst_loss_fn, self.k_sample, self.subtyping)
            if inst is not None:
                aux["inst"] = self.inst_weight * inst
        return MILOutput(logits=self.head(z), attention=a, aux_losses=aux,
                         extras={"attention_raw": a_raw, "embedding": z})


@METHODS.register("clam_sb")
class CLAMSB(MILModule):
    """CLAM-SB; the task loss is scaled by ``bag_weight`` (the instance term by ``inst_weight``)."""

    Net = CLAMSBNet
    # the attention score's bias feeds only a softmax (shift-invariant) and a top-k: gradient 0

    def target_losses(self, out: MILOutput, bag: Bag) -> dict[str, torch.Tensor]:
        return {k: self.net.bag_weight * v for k, v in super().target_losses(out, bag).items()}
