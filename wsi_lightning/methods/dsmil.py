"""DSMIL: dual-stream MIL with a critical-instance query (Li, Li and Eliceiri, CVPR 2021).

Stream 1 scores every instance (``c_i = W h_i``) and takes the critical instance ``m`` of each
class (the arg-max score). Stream 2 compares every instance's query ``q_i`` with the critical
one's, ``A_i = softmax_i(<q_i, q_m> / sqrt(d_q))``, pools ``B = sum_i A_i v_i`` per class, and
scores the bag with a 1-D convolution over B (``docs/methods.md`` 6.2).

Deviations from paper:
    - Softmax heads with cross-entropy instead of per-class sigmoids with BCE: the bag stream
      gives the task logits; the max-instance stream's cross-entropy is the auxiliary loss
      ``max_instance`` (weight ``max_weight``, 1.0 = the code's 0.5 / 0.5 split).
    - ``average=true`` predicts with the mean of the bag and max-instance logits (the code's
      ``--average`` averages sigmoids).
    - Orthogonal initialisation as in the code is not applied (PyTorch defaults); the value
      embedding is the identity by default (``passing_v=false``), like the code.
    - Several targets (multi-tag): one instance classifier, query comparison and bag
      convolution per target, sharing the query network.
    - ``attention`` in the output is each class's map, (B, C, N), for the first target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import masked_softmax
from wsi_lightning.registry import METHODS


class DSMILNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}.
        q_dim: query size (128 in the code).
        passing_v: embed values with Linear-ReLU (else identity).
        dropout_v: dropout of the value embedding.
        max_weight: weight of the max-instance loss relative to the bag loss.
        average: predict with the mean of bag and max-instance logits.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], q_dim: int = 128,
                 passing_v: bool = False, dropout_v: float = 0.0, max_weight: float = 1.0,
                 average: bool = False) -> None:
        super().__init__()
        self.q = nn.Sequential(nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
                  if passing_v else nn.Identity())
        self.inst = nn.ModuleDict({t: nn.Linear(in_dim, c) for t, c in num_classes.items()})
        self.bag = nn.ModuleDict({t: nn.Conv1d(c, c, kernel_size=in_dim) for t, c in num_classes.items()})
        self.q_dim, self.max_weight, self.average = q_dim, max_weight, average

    def forward(self, bag: Bag) -> MILOutput:
        h, mask = bag.features, bag.mask  # (B, N, D), (B, N)
        q, v = self.q(h), self.v(h)  # (B, N, Q), (B, N, D)
        logits, aux, att = {}, {}, None
        pad = (~mask).unsqueeze(-1)  # (B, N, 1)
        for t, inst in self.inst.items():
            c = inst(h).masked_fill(pad, float("-inf"))  # (B, N, C)
            m = c.argmax(1)  # (B, C) critical instance per class
            q_m = torch.gather(q, 1, m.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
            s = torch.einsum("bnq,bcq->bcn", q, q_m) / math.sqrt(self.q_dim)  # (B, C, N)
            a = masked_softmax(s, mask[:, None, :])  # (B, C, N)
            pooled = torch.einsum("bcn,bnd->bcd", a, v)  # (B, C, D)
            bag_logit = self.bag[t](pooled).squeeze(-1)  # (B, C)
            max_logit = torch.nan_to_num(c.amax(1), neginf=0.0)  # (B, C)
            logits[t] = (bag_logit + max_logit) / 2 if self.average else bag_logit
            aux[t] = max_logit
            att = a if att is None else att
        return MILOutput(logits=logits, attention=att, extras={"max_instance_logits": aux})

    def max_instance_loss(self, out: MILOutput, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = [F.cross_entropy(v.float(), labels[t], ignore_index=-1)
                 for t, v in out.extras["max_instance_logits"].items() if bool((labels[t] >= 0).any())]
        return self.max_weight * torch.stack(terms).sum() if terms else torch.zeros(())


@METHODS.register("dsmil")
class DSMIL(MILModule):
    Net = DSMILNet
    class_weighted = False  # the max-instance CE is the net's own

    def target_losses(self, out: MILOutput, bag: Bag) -> dict[str, torch.Tensor]:
        losses = super().target_losses(out, bag)
        losses["max_instance"] = self.net.max_instance_loss(out, bag.labels)
        return losses
