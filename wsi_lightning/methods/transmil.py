"""TransMIL: transformer-based correlated MIL (Shao et al., "TransMIL: Transformer based
correlated multiple instance learning for whole slide image classification", NeurIPS 2021).

Instances are embedded (``Linear D -> 512, ReLU``). The n tokens of a bag are "squared": the
first ``s² - n`` tokens are appended again, s = ⌈√n⌉, so that they fill an s × s grid. A class
token is prepended and the sequence goes through two pre-norm Nyström self-attention layers
(``x + NystromAttn(LN(x))``; 8 heads of 64, 256 landmarks, value convolution, dropout 0.1) with
the Pyramid Position Encoding Generator (PPEG) between them: the grid tokens are laid out
row-major on the s × s grid and replaced by ``x + DWConv7(x) + DWConv5(x) + DWConv3(x)``
(depthwise, zero-padded), the class token passing unchanged. The class token, layer-normed, is
classified by a linear head per target.

Attention map: Nyström attention has no exact per-token attention row. ``MILOutput.attention``
is the *exact* softmax attention the class token's query pays to the instance tokens' keys in
the second layer (the row Nyström approximates), with the class token's own key left out,
averaged over heads, and with each duplicated grid token's weight added to the instance it
copies: (B, N), summing to 1 over valid instances, 0 at padding. It is a diagnostic, computed
without gradient and not used by the prediction; ``cls_attention=false`` returns None.

Deviations from paper:
    - Batched over B padded bags (the paper trains one slide at a time): each bag is squared
      with its own n (s_b = ⌈√n_b⌉, duplicating its own first valid instances), the sequences
      are padded to the longest, and the mask keeps padding out of the Nyström attention (see
      :mod:`wsi_lightning.nn.nystrom`, which also lists how its landmarks differ from the
      library the code uses). PPEG places bag b's tokens in the top-left s_b × s_b block of a
      zero grid of the batch's largest side: with zero padding the convolutions then see
      exactly the bag's own grid, so a bag's output never depends on its batch-mates or on how
      much it is padded.
    - Masks with valid instances after padding are compacted (valid instances first, in
      order) before squaring.
    - Several targets (multi-tag, not in the paper): one linear head per target on the class
      token.
    - Optimiser: the paper's RAdam + Lookahead is not offered; the experiment YAML uses AdamW
      (same lr 2e-4 and weight decay 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead, instance_mlp, masked_softmax
from wsi_lightning.nn.nystrom import NystromAttention
from wsi_lightning.registry import METHODS


def square_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TransMIL's squared sequence of each bag: its n valid instances, then its first s² - n
    valid instances again, s = ⌈√n⌉ (s² - n <= n, so one wrap suffices).

    Args:
        mask: (B, N) bool, True for valid instances.

    Returns:
        index: (B, L) int64 instance position of each grid token, L = max_b s_b² (>= 1);
            entries past a bag's s_b² point at a valid instance but are masked.
        valid: (B, L) bool, True for the bag's s_b² grid tokens.
        side: (B,) int64 s_b (0 for a bag without valid instance).
    """
    n = mask.sum(1)  # (B,)
    side = torch.sqrt(n.double()).ceil().long()  # (B,) ⌈√n⌉, corrected for rounding below
    side = side + (side * side < n).long()
    side = side - ((side - 1).clamp(min=0) ** 2 >= n).long() * (side > 0).long()
    length = max(int((side * side).max()), 1)
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, N) valid first
    j = torch.arange(length, device=mask.device)  # (L,)
    src = j[None] % n.clamp(min=1)[:, None]  # (B, L) rank among the valid instances
    index = order.gather(1, src.clamp(max=mask.shape[1] - 1))  # (B, L)
    return index, j[None] < (side * side)[:, None], side


class PPEG(nn.Module):
    """Pyramid Position Encoding Generator: ``x + DWConv7(x) + DWConv5(x) + DWConv3(x)`` on the
    row-major s_b × s_b grid of each bag's tokens (zero padding outside the bag's grid).

    Args:
        dim: token size C.
        kernels: depthwise kernel sizes (7, 5, 3 in the paper).
    """

    def __init__(self, dim: int, kernels: tuple[int, ...] = (7, 5, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in kernels)

    def forward(self, x: torch.Tensor, side: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, L, C) grid tokens (class token excluded).
            side: (B,) int64 grid side s_b of each bag.
            valid: (B, L) bool, True for the bag's s_b² tokens.

        Returns:
            (B, L, C); 0 where not valid.
        """
        b, length, c = x.shape
        s = max(int(side.max()), 1)
        j = torch.arange(length, device=x.device)[None]  # (1, L)
        w = side.clamp(min=1)[:, None]  # (B, 1)
        pos = torch.where(valid, (j // w) * s + j % w, s * s)  # (B, L) cell; invalid -> dump cell
        idx = pos[..., None].expand(-1, -1, c)  # (B, L, C)
        grid = x.new_zeros(b, s * s + 1, c).scatter_add_(1, idx, x * valid[..., None])  # (B, s²+1, C)
        grid = grid[:, : s * s].transpose(1, 2).reshape(b, c, s, s)  # (B, C, s, s)
        grid = grid + sum(conv(grid) for conv in self.convs)  # (B, C, s, s)
        flat = F.pad(grid.flatten(2).transpose(1, 2), (0, 0, 0, 1))  # (B, s²+1, C)
        return flat.gather(1, idx).masked_fill(~valid[..., None], 0.0)  # (B, L, C)


class TransLayer(nn.Module):
    """Pre-norm Nyström self-attention with a residual and no feed-forward: ``x + A(LN(x))``.

    Args:
        dim: token size; heads of ``dim // heads``; landmarks ``num_landmarks`` (None = dim // 2).
        heads, num_landmarks, pinv_iterations, conv_kernel, dropout: see :class:`NystromAttention`.
    """

    def __init__(self, dim: int, heads: int = 8, num_landmarks: int | None = None,
                 pinv_iterations: int = 6, conv_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads,
                                     num_landmarks=num_landmarks or max(dim // 2, 1),
                                     pinv_iterations=pinv_iterations, residual_conv=True,
                                     conv_kernel=conv_kernel, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim); mask: (B, L) bool. Returns (B, L, dim), 0 at padding if x is."""
        return x + self.attn(self.norm(x), mask)

    def first_token_attention(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Exact softmax attention of token 0's query over the ``keys`` tokens, per head.

        Args:
            x: (B, L, dim) the layer's input.
            keys: (B, L) bool, the tokens attended to.

        Returns:
            (B, H, L), summing to 1 over ``keys``.
        """
        a = self.attn
        b, length, _ = x.shape
        inner = a.heads * a.dim_head
        w = a.to_qkv.weight  # (3·inner, dim): rows [q | k | v], each (heads, dim_head)
        xn = self.norm(x)  # (B, L, dim)
        q = F.linear(xn[:, 0], w[:inner]).view(b, a.heads, a.dim_head) * a.scale  # (B, H, d)
        k = F.linear(xn, w[inner: 2 * inner]).view(b, length, a.heads, a.dim_head)  # (B, L, H, d)
        s = torch.einsum("bhd,blhd->bhl", q, k)  # (B, H, L)
        return masked_softmax(s, keys[:, None, :])


class TransMILNet(nn.Module):
    """Args:
        in_dim: instance feature size D.
        num_classes: {target: C}.
        embed_dim: token size (512).
        heads: attention heads (8; head size embed_dim // heads).
        num_landmarks: Nyström landmarks (None = embed_dim // 2 = 256).
        pinv_iterations: Moore–Penrose iterations (6).
        conv_kernel: kernel of the Nyström value convolution (33).
        attn_dropout: dropout of the attention output projection (0.1).
        dropout: dropout after the embedding (0: the code has none).
        cls_attention: return the class token's attention map (see module doc).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], embed_dim: int = 512,
                 heads: int = 8, num_landmarks: int | None = None, pinv_iterations: int = 6,
                 conv_kernel: int = 33, attn_dropout: float = 0.1, dropout: float = 0.0,
                 cls_attention: bool = True) -> None:
        super().__init__()
        if heads < 1 or embed_dim % heads:
            raise ConfigError(f"transmil: method.embed_dim={embed_dim} must be divisible by "
                              f"method.heads={heads}")
        self.embed = instance_mlp(in_dim, embed_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        layer = dict(heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
                     conv_kernel=conv_kernel, dropout=attn_dropout)
        self.layer1 = TransLayer(embed_dim, **layer)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = TransLayer(embed_dim, **layer)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = MultiHead(embed_dim, num_classes)
        self.cls_attention = cls_attention

    def forward(self, bag: Bag) -> MILOutput:
        index, valid, side = square_layout(bag.mask)  # (B, L), (B, L), (B,)
        h = self.embed(bag.features)  # (B, N, E)
        e = h.shape[-1]
        x = h.gather(1, index[..., None].expand(-1, -1, e)).masked_fill(~valid[..., None], 0.0)  # (B, L, E)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)  # (B, 1+L, E)
        mask = F.pad(valid, (1, 0), value=True)  # (B, 1+L) class token always valid
        x = self.layer1(x, mask)
        x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], side, valid)], 1)  # (B, 1+L, E)
        att = self.instance_attention(x, valid, index, bag.mask) if self.cls_attention else None
        x = self.layer2(x, mask)
        z = self.norm(x[:, 0])  # (B, E)
        return MILOutput(logits=self.head(z), attention=att, extras={"embedding": z})

    @torch.no_grad()
    def instance_attention(self, x: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
                           inst_mask: torch.Tensor) -> torch.Tensor:
        """The class token's layer-2 softmax attention folded onto instances (module doc).

        Args:
            x: (B, 1+L, E) layer-2 input; valid: (B, L); index: (B, L); inst_mask: (B, N).

        Returns:
            (B, N), summing to 1 over valid instances, 0 at padding.
        """
        keys = F.pad(valid, (1, 0), value=False)  # (B, 1+L) instance tokens only
        a = self.layer2.first_token_attention(x, keys).mean(1)[:, 1:]  # (B, L)
        att = torch.zeros(inst_mask.shape, dtype=a.dtype, device=a.device)  # (B, N)
        return att.scatter_add_(1, index, a * valid)


@METHODS.register("transmil")
class TransMIL(MILModule):
    Net = TransMILNet
    # the contract tests run the same code at small widths (256 landmarks are slow on CPU); 16
    # landmarks also make the tests' bags longer than the landmark count
