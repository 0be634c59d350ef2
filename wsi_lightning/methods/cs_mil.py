"""CS-MIL: cross-scale attention-guided MIL (Deng et al., MMMI 2022; MedIA 2024), on the
DeepAttnMISL backbone (``docs/methods.md`` section 3).

Per instance and scale s (20x, 10x, 5x windows sharing one centre): MI-FCN embedding
``f_s = ReLU(W_e x_s)`` (64-d), cross-scale score ``r_s = w_2^T act(W_1 f_s)``, fusion
``F = sum_s r_s f_s``; then DeepAttnMISL attention over all instances of the bag and its
classifier. Input bags are (B, N, S, D).

Deviations from paper:
    - Cross-scale scores are used raw by default (``cs_norm=none``, the official code); the
      paper's Eq. 2 is a softmax over scales (``cs_norm=softmax``). Activation ``relu`` (code
      and Table 3's best row) by default; ``tanh`` is Eq. 2 (docs/methods.md register items 10, 11).
    - ``shared=true`` shares both the embedding and the cross-scale attention across scales
      (Table 3's "Sharing"); ``false`` gives each scale its own embedding and attention.
    - Softmax head(s) with cross-entropy instead of the clamped Bernoulli NLL.
    - Cluster-stratified bag sampling, gradient accumulation over 4 bags and test-time
      averaging over 100 random bags live in the multi-scale DataModule / config, not here.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.methods.deepattnmisl import misl_head
from wsi_lightning.nn import AttentionPool, instance_mlp
from wsi_lightning.registry import METHODS

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh}
NORMS = ("none", "softmax")


class CSMILNet(nn.Module):
    """Args:
        in_dim: feature size D of each scale.
        num_classes: {target: C}.
        n_scales: S.
        shared: share embedding and cross-scale attention across scales.
        cs_act: ``relu`` | ``tanh`` inside the cross-scale attention.
        cs_norm: ``none`` | ``softmax`` over scales.
        embed_dim / cs_dim / attn_dim / head_dim: 64 / 32 / 32 / 32 in the code.
        dropout: classifier dropout.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], n_scales: int = 3, shared: bool = True,
                 cs_act: str = "relu", cs_norm: str = "none", embed_dim: int = 64, cs_dim: int = 32,
                 attn_dim: int = 32, head_dim: int = 32, dropout: float = 0.5) -> None:
        super().__init__()
        if cs_act not in ACTS or cs_norm not in NORMS:
            raise ValueError(f"cs_act '{cs_act}' / cs_norm '{cs_norm}'; expected {sorted(ACTS)} / {list(NORMS)}")
        n_mod = 1 if shared else n_scales
        self.n_scales, self.cs_norm = n_scales, cs_norm
        self.embed = nn.ModuleList(instance_mlp(in_dim, embed_dim) for _ in range(n_mod))
        self.cs = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, cs_dim), ACTS[cs_act](), nn.Linear(cs_dim, 1))
                                for _ in range(n_mod))
        self.pool = AttentionPool(embed_dim, attn_dim)
        self.head = misl_head(embed_dim, head_dim, dropout, num_classes)

    def forward(self, bag: Bag) -> MILOutput:
        x = bag.features  # (B, N, S, D)
        if x.dim() != 4 or x.shape[2] != self.n_scales:
            raise ValueError(f"cs_mil expects (B, N, {self.n_scales}, D) multi-scale bags, got {tuple(x.shape)}; "
                             "use the multi-scale data (data.multiscale.mode=stack)")
        pick = (lambda m, s: m[0]) if len(self.embed) == 1 else (lambda m, s: m[s])
        f = torch.stack([pick(self.embed, s)(x[:, :, s]) for s in range(self.n_scales)], 2)  # (B, N, S, 64)
        r = torch.cat([pick(self.cs, s)(f[:, :, s]) for s in range(self.n_scales)], -1)  # (B, N, S)
        if self.cs_norm == "softmax":
            r = r.softmax(-1)
        fused = torch.einsum("bns,bnse->bne", r, f)  # (B, N, 64)
        z, a = self.pool(fused, bag.mask)  # (B, 1, 64), (B, 1, N)
        return MILOutput(logits=self.head(z[:, 0]), attention=a[:, 0],
                         cross_scale=r.masked_fill(~bag.mask[..., None], 0.0))


@METHODS.register("cs_mil")
class CSMIL(MILModule):
    Net = CSMILNet
    input_kind = "multiscale"
