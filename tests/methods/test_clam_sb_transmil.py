"""CLAM-SB's instance-clustering loss and TransMIL's squaring / PPEG under padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.methods_helpers import CONTRACT_KWARGS
from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.clam_sb import CLAMSB, clam_instance_loss
from wsi_lightning.methods.transmil import PPEG, TransMILNet, square_layout

D = 8


class Recorder(nn.Module):
    """Instance classifier stand-in: logits = first two features; records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(h.detach().clone())
        return h[:, :2]


class TargetsLoss(nn.Module):
    """Loss stand-in recording its targets; returns a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.targets.append(targets.clone())
        return scores.sum() * 0.0 + 1.0


def _bag(lens: list[int], n_max: int, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n_max)[None] < torch.tensor(lens)[:, None]
    feats = torch.randn(len(lens), n_max, D, generator=g)
    feats[~mask] = 1e3 * torch.randn(int((~mask).sum()), D, generator=g)  # garbage padding
    return Bag(feats, mask, torch.zeros(len(lens), n_max, 2, dtype=torch.long), {},
               [f"s{i}" for i in range(len(lens))])


def test_instance_loss_uses_exactly_top_and_bottom_k_valid_instances():
    h = torch.arange(8.0)[None, :, None].expand(2, 8, 4).clone()  # instance i has features i
    scores = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 100.0, -100.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])  # padding has extreme scores
    clfs, loss = nn.ModuleList([Recorder(), Recorder()]), TargetsLoss()
    out = clam_instance_loss(scores, h, mask, torch.tensor([1, -1]), clfs, loss, k=2)
    assert out == 1.0  # mean over the one labelled bag
    assert not clfs[0].seen, "subtyping=False: only the true class's classifier is used"
    assert clfs[1].seen[0][:, 0].tolist() == [2.0, 4.0, 1.0, 5.0]  # top-2 (9, 7), bottom-2 (1, 2)
    assert loss.targets[0].tolist() == [1, 1, 0, 0]


def test_instance_loss_small_bag_subtyping_and_no_labels():
    h = torch.randn(1, 5, 4)
    scores, mask = torch.tensor([[3.0, 1.0, 2.0, 50.0, 60.0]]), torch.tensor([[True] * 3 + [False] * 2])
    clfs, loss = nn.ModuleList([Recorder() for _ in range(3)]), TargetsLoss()
    clam_instance_loss(scores, h, mask, torch.tensor([0]), clfs, loss, k=8, subtyping=True)
    assert len(clfs[0].seen[0]) == 6  # k = n = 3 per side
    for c in (1, 2):  # out-of-class: the bag's top-k are negatives for the other classes
        torch.testing.assert_close(clfs[c].seen[0], h[0, [0, 2, 1]])
    assert [t.tolist() for t in loss.targets[1:]] == [[0, 0, 0], [0, 0, 0]]
    assert clam_instance_loss(scores, h, mask, torch.tensor([-1]), clfs, loss, k=8) is None


def test_clam_loss_weights_and_inst_term_at_eval():
    model = CLAMSB(in_dim=D, num_classes={"label": 2}, bag_weight=0.7, inst_weight=0.3,
                   k_sample=2).eval()
    bag = _bag([6, 4], 6)
    assert "inst" not in model(bag).aux_losses  # no labels, no instance loss
    bag.labels = {"label": torch.tensor([1, 0])}
    out = model(bag)
    assert set(out.aux_losses) == {"inst"} and out.aux_losses["inst"] > 0
    raw = clam_instance_loss(
        out.extras["attention_raw"], model.net.embed(bag.features) * bag.mask[..., None], bag.mask,
        bag.labels["label"], model.net.instance_classifiers, model.net.inst_loss_fn, 2)
    torch.testing.assert_close(out.aux_losses["inst"], 0.3 * raw)
    ce = F.cross_entropy(out.logits["label"], bag.labels["label"])
    torch.testing.assert_close(model.task_loss(out, bag)["loss_task"], 0.7 * ce)


@pytest.mark.parametrize(("n", "side"), [(0, 0), (1, 1), (2, 2), (4, 2), (5, 3), (9, 3), (10, 4), (17, 5)])
def test_square_layout_sizes(n: int, side: int):
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, :n] = True
    index, valid, s = square_layout(mask)
    assert int(s) == side and int(valid.sum()) == side * side
    if n:
        assert index[0, : side * side].tolist() == [i % n for i in range(side * side)]


def test_square_layout_compacts_interleaved_masks():
    mask = torch.tensor([[False, True, False, True, True, False, True, True]])  # 5 valid
    index, valid, side = square_layout(mask)
    assert int(side) == 3
    assert index[0, :9].tolist() == [1, 3, 4, 6, 7, 1, 3, 4, 6]


def test_ppeg_matches_the_bags_own_grid_whatever_the_batch():
    torch.manual_seed(0)
    ppeg = PPEG(4)
    lens = [5, 30]  # sides 3 and 6: bag 0 sits in a 6 x 6 grid of the batch
    mask = torch.arange(30)[None] < torch.tensor(lens)[:, None]
    index, valid, side = square_layout(mask)
    x = torch.randn(2, index.shape[1], 4).masked_fill(~valid[..., None], 0.0)
    out = ppeg(x, side, valid)
    for b, s in enumerate(side.tolist()):
        g = x[b, : s * s].T.reshape(1, 4, s, s)  # the bag's own row-major grid
        ref = g + sum(F.conv2d(g, c.weight, c.bias, padding=c.padding, groups=4) for c in ppeg.convs)
        torch.testing.assert_close(out[b, : s * s], ref.flatten(2)[0].T)
        assert (out[b, s * s:] == 0).all()


def test_transmil_bag_alone_equals_bag_in_batch_and_interleaved_padding():
    torch.manual_seed(0)
    net = TransMILNet(D, {"label": 3}, **CONTRACT_KWARGS["transmil"]).eval()
    batch = _bag([5, 40], 40)  # sides 3 and 7
    alone = Bag(batch.features[:1, :5], batch.mask[:1, :5], batch.coords[:1, :5], {}, ["s0"])
    perm = torch.tensor([7, 0, 8, 1, 2, 9, 3, 10, 4, 11])  # valid instances 0..4 interleaved with padding
    inter = Bag(batch.features[:1, perm], batch.mask[:1, perm], batch.coords[:1, perm], {}, ["s0"])
    with torch.no_grad():
        a, b, c = net(alone), net(batch), net(inter)
    torch.testing.assert_close(a.logits["label"], b.logits["label"][:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logits["label"], c.logits["label"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.attention.sum(1), torch.ones(2))
    torch.testing.assert_close(a.attention[0], b.attention[0, :5], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.attention[0, perm.argsort()[:5]], a.attention[0], rtol=1e-4, atol=1e-6)
    assert (c.attention[0][~inter.mask[0]] == 0).all()
    assert TransMILNet(D, {"label": 3}, cls_attention=False, **CONTRACT_KWARGS["transmil"])(alone).attention is None
