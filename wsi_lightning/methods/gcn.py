"""GCN baseline of Li et al., "Patch Transformer for multi-tagging whole slide histopathology
images", MICCAI 2019, Table 2 (docs/methods.md §1.7), after Kipf and Welling, "Semi-supervised
classification with graph convolutional networks", ICLR 2017.

Patches are nodes; edges join spatially close patches (their level-0 ``bag.coords``): the ``k``
nearest valid patches (``graph=knn``, symmetrised) or every valid patch within ``radius``
level-0 pixels (``graph=radius``); in a patient-level bag (``data.bag_level=case``) only patches
of the same slide are joined (``Bag.slide_index``: every slide has its own coordinate frame).
Each layer is Kipf's ``H' = ReLU(Â H W)`` with
``Â = D^-1/2 (A + I) D^-1/2``; a max-pool over the valid nodes reads the slide out, one linear
softmax head per tag classifies it. Padded nodes have no edges and never reach the readout.

Deviations from paper:
    - The paper names Kipf's public code, a max-pool readout and spatial-distance edges only.
      The edge rule (k-NN with k = 8 by default, or a radius), the widths (two layers of 256,
      Kipf's code has 16 for citation graphs) and dropout are config keys.
    - Dense adjacency per bag, (B, N, N): fine for M = 32 sampled patches; for full slides of
      many thousand tiles, cap the bag with ``data.max_bag_size`` (training) or use a GPU.
    - Ties in k-NN distance (e.g. duplicated coordinates) go to the lower patch index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.nn import MultiHead
from wsi_lightning.registry import METHODS

GRAPHS = ("knn", "radius")


def spatial_adjacency(coords: torch.Tensor, mask: torch.Tensor, graph: str = "knn", k: int = 8,
                      radius: float | None = None, group: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric 0/1 adjacency between the valid patches of each bag, without self-loops.

    Args:
        coords: (B, N, 2) level-0 (x, y) of each patch.
        mask: (B, N) bool valid patches.
        graph: ``knn`` (each patch joined to its k nearest valid patches, then symmetrised) or
            ``radius`` (patches at most ``radius`` level-0 px apart).
        k: neighbours per patch for ``knn``.
        radius: distance threshold for ``radius``.
        group: (B, N) int64, e.g. each patch's slide in a patient-level bag; only patches of
            one group are joined. None: one group.

    Returns:
        (B, N, N) float adjacency; rows and columns of padded patches are 0.
    """
    c = coords.double()
    dist = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N, N) exact
    pair = mask[:, :, None] & mask[:, None, :]  # (B, N, N) both valid
    if group is not None:
        pair = pair & (group[:, :, None] == group[:, None, :])  # (B, N, N) same slide
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)[None]  # (1, N, N)
    if graph == "radius":
        adj = (dist <= float(radius)) & pair & ~eye
    else:
        dist = dist.masked_fill(~pair | eye, float("inf"))
        order = torch.sort(dist, dim=-1, stable=True).indices[..., :k]  # (B, N, k) nearest first
        near = torch.gather(dist, -1, order).isfinite()  # (B, N, k) real neighbours only
        adj = torch.zeros_like(pair).scatter_(-1, order, near)  # (B, N, N)
        adj = adj | adj.transpose(1, 2)
    return adj.to(coords.device, torch.float32)


def normalised_adjacency(adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kipf's renormalisation ``D^-1/2 (A + I) D^-1/2`` over valid nodes: (B, N, N) -> (B, N, N)."""
    a = adj + torch.diag_embed(mask.to(adj.dtype))  # (B, N, N) self-loops on valid nodes
    d = a.sum(-1)  # (B, N)
    inv = torch.where(d > 0, d.clamp(min=1e-12).rsqrt(), torch.zeros_like(d))  # (B, N)
    return inv[:, :, None] * a * inv[:, None, :]


class GCNLayer(nn.Module):
    """``H' = Â H W + b`` (activation applied by the caller): (B, N, D_in) -> (B, N, D_out)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a_hat, F.linear(h, self.lin.weight)) + self.lin.bias  # Kipf: bias after propagation


class GCNNet(nn.Module):
    """Args:
        in_dim: patch feature size D.
        num_classes: {tag: C}.
        hidden_dims: output size of each graph convolution.
        graph: ``knn`` or ``radius`` (edges from level-0 patch coordinates).
        k: neighbours per patch (``knn``).
        radius: level-0 pixel distance (``radius``; e.g. 1.5 x the tile extent joins the 8
            grid neighbours).
        dropout: dropout before each graph convolution (Kipf: 0.5).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], hidden_dims: tuple[int, ...] = (256, 256),
                 graph: str = "knn", k: int = 8, radius: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"gcn: method.graph={graph!r}; expected one of {list(GRAPHS)}")
        if graph == "radius" and (radius is None or radius <= 0):
            raise ValueError(f"gcn: method.graph=radius needs method.radius > 0 (level-0 pixels), got {radius!r}")
        if graph == "knn" and k < 1:
            raise ValueError(f"gcn: method.k={k}; expected >= 1")
        if not hidden_dims:
            raise ValueError("gcn: method.hidden_dims is empty; give at least one layer size, e.g. [256, 256]")
        dims = (in_dim, *hidden_dims)
        self.layers = nn.ModuleList(GCNLayer(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True))
        self.drop = nn.Dropout(dropout)
        self.graph, self.k, self.radius = graph, k, radius
        self.head = MultiHead(dims[-1], num_classes)

    def forward(self, bag: Bag) -> MILOutput:
        mask = bag.mask  # (B, N)
        group = getattr(bag, "slide_index", None)  # patient-level bags: no edges between slides
        adj = spatial_adjacency(bag.coords, mask, self.graph, self.k, self.radius, group)  # (B, N, N)
        a_hat = normalised_adjacency(adj, mask)  # (B, N, N)
        h = bag.features.masked_fill(~mask[..., None], 0.0)  # (B, N, D)
        for layer in self.layers:
            h = torch.relu(layer(self.drop(h), a_hat))  # (B, N, H)
        z = h.masked_fill(~mask[..., None], float("-inf")).amax(1)  # (B, H) max-pool readout
        z = torch.where(mask.any(1, keepdim=True), z, torch.zeros_like(z))  # empty bag -> 0
        return MILOutput(logits=self.head(z))


@METHODS.register("gcn")
class GCN(MILModule):
    Net = GCNNet
