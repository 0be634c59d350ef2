"""TwoBranches (patch CE with inherited tags) and the GCN baseline (spatial graph, Kipf layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.methods_helpers import tiny_bag
from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.gcn import GCNNet, normalised_adjacency, spatial_adjacency
from wsi_lightning.methods.two_branches import TwoBranchesNet, inherited_patch_ce

TAGS = {"stain": 3, "organ": 4}
D = 8


# ----------------------------------------------------------------------------- TwoBranches
def test_patch_ce_uses_the_slide_tags_on_valid_patches_only():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logits = {"stain": torch.randn(2, 3, 3), "organ": torch.randn(2, 3, 4)}
    labels = {"stain": torch.tensor([2, 0]), "organ": torch.tensor([1, -1])}  # organ unknown for slide 2
    ce = inherited_patch_ce(logits, labels, mask)
    stain = F.cross_entropy(torch.cat([logits["stain"][0], logits["stain"][1, :1]]), torch.tensor([2, 2, 2, 0]))
    organ = F.cross_entropy(logits["organ"][0], torch.tensor([1, 1, 1]))
    torch.testing.assert_close(ce, stain + organ)
    assert inherited_patch_ce(logits, {t: torch.full((2,), -1) for t in TAGS}, mask) is None


def test_two_branches_aux_loss_trains_the_patch_branch_and_prediction_is_the_slide_branch():
    torch.manual_seed(0)
    net = TwoBranchesNet(D, TAGS, embed_dim=6, attn_dim=4, patch_weight=0.5)
    bag = tiny_bag(D)
    assert net(bag).aux_losses == {}  # no labels (prediction): no patch loss
    bag.labels = {"stain": torch.tensor([0, 2]), "organ": torch.tensor([3, 1])}
    out = net(bag)
    ref = 0.5 * inherited_patch_ce(out.extras["instance_logits"], bag.labels, bag.mask)
    torch.testing.assert_close(out.aux_losses["patch_ce"], ref)
    out.aux_losses["patch_ce"].backward()
    assert net.patch_head.heads["organ"].weight.grad.abs().sum() > 0
    assert net.head.heads["organ"].weight.grad is None  # slide heads are not in the patch loss
    with torch.no_grad():
        for h in net.patch_head.heads.values():
            h.weight.add_(1.0)
        torch.testing.assert_close(net(bag).logits["stain"], out.logits["stain"])  # slide branch only


# ----------------------------------------------------------------------------- GCN
def grid(n_side: int = 3, step: int = 100) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    return (torch.stack([xs.flatten(), ys.flatten()], -1) * step)[None]  # (1, n_side^2, 2)


def test_radius_and_knn_graphs_on_a_grid():
    c = grid()
    mask = torch.ones(1, 9, dtype=torch.bool)
    rook = spatial_adjacency(c, mask, "radius", radius=100)[0]  # 4-neighbourhood
    assert rook[4].sum() == 4 and rook[0].sum() == 2 and torch.equal(rook, rook.T) and rook.diagonal().sum() == 0
    king = spatial_adjacency(c, mask, "radius", radius=150)[0]  # 8-neighbourhood
    assert king[4].sum() == 8 and king[0].sum() == 3
    knn = spatial_adjacency(c, mask, "knn", k=2)[0]
    assert torch.equal(knn, knn.T) and (knn.sum(1) >= 2).all() and knn.diagonal().sum() == 0
    assert knn[0, 1] == 1 and knn[0, 3] == 1 and knn[0, 8] == 0  # corner: its two rook neighbours
    mask[0, 4] = False  # the centre becomes padding: no edge may touch it
    a = spatial_adjacency(c, mask, "knn", k=3)[0]
    assert a[4].sum() == 0 and a[:, 4].sum() == 0


def test_no_edges_between_the_slides_of_a_case_bag():
    """Patient-level bags: two slides on the same grid (their own frames) share coordinates;
    only patches of one slide (``group``, the bag's ``slide_index``) are joined."""
    c = torch.cat([grid(), grid()], 1)  # (1, 18, 2): slide 0 then slide 1, same coordinates
    mask = torch.ones(1, 18, dtype=torch.bool)
    group = torch.tensor([[0] * 9 + [1] * 9])
    for graph, kw in (("radius", {"radius": 100}), ("knn", {"k": 3})):
        a = spatial_adjacency(c, mask, graph, group=group, **kw)[0]
        assert a[:9, 9:].sum() == 0 and a[9:, :9].sum() == 0, graph
        alone = spatial_adjacency(grid(), mask[:, :9], graph, **kw)[0]
        assert torch.equal(a[:9, :9], alone) and torch.equal(a[9:, 9:], alone), graph
    assert spatial_adjacency(c, mask, "radius", radius=100)[0, :9, 9:].sum() > 0  # without groups: joined


def test_normalised_adjacency_is_kipfs_renormalisation():
    c = grid(2)
    mask = torch.tensor([[True, True, True, False]])
    adj = spatial_adjacency(c, mask, "radius", radius=100)
    a = adj[0] + torch.diag(mask[0].float())
    d = a.sum(1)
    inv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    torch.testing.assert_close(normalised_adjacency(adj, mask)[0], inv[:, None] * a * inv[None])
    assert normalised_adjacency(adj, mask)[0, 3].abs().sum() == 0


def gcn_bag(perm: torch.Tensor | None = None) -> Bag:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 9, D, generator=g), grid()
    if perm is not None:
        x, c = x[:, perm], c[:, perm]
    return Bag(x, torch.ones(1, 9, dtype=torch.bool), c)


def test_gcn_is_permutation_invariant_and_uses_the_graph():
    torch.manual_seed(0)
    net = GCNNet(D, TAGS, hidden_dims=(6, 6), graph="radius", radius=100).eval()
    with torch.no_grad():
        a = net(gcn_bag())
        b = net(gcn_bag(torch.randperm(9)))
        moved = gcn_bag()
        moved.coords = moved.coords * 10  # no edge within the radius any more
        c = net(moved)
    torch.testing.assert_close(a.logits["organ"], b.logits["organ"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.logits["organ"], c.logits["organ"])


def test_gcn_arguments_checked():
    with pytest.raises(ValueError, match="radius"):
        GCNNet(D, TAGS, graph="radius")
    with pytest.raises(ValueError, match="graph"):
        GCNNet(D, TAGS, graph="delaunay")
    with pytest.raises(ValueError, match="hidden_dims"):
        GCNNet(D, TAGS, hidden_dims=())
