from __future__ import annotations

import torch

from tests.methods_helpers import tiny_bag
from wsi_lightning.methods.chowder import ChowderNet, minmax_scores


def test_minmax_sorted_and_never_padding():
    s = torch.tensor([[3.0, -1.0, 7.0, 0.5, 100.0, -100.0],
                      [2.0, 1.0, 0.0, -50.0, 50.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False, False],
                         [True, True, True, False, False, False]])
    desc, idx = minmax_scores(s, mask, r=2)
    assert desc.tolist() == [[7.0, 3.0, -1.0, 0.5], [2.0, 1.0, 0.0, 1.0]]
    assert mask.gather(1, idx).all(), "a padded tile entered the top/bottom R"


def test_fewer_tiles_than_r_repeats_valid_scores():
    s = torch.tensor([[4.0, 1.0, 2.0, 99.0, -99.0]])
    mask = torch.tensor([[True, True, True, False, False]])
    desc, idx = minmax_scores(s, mask, r=5)
    assert desc.tolist() == [[4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0, 4.0]]
    assert mask.gather(1, idx).all()


def test_l2_penalty_on_scorer_and_extras():
    net = ChowderNet(in_dim=8, num_classes={"label": 2}, r=3, scorer_l2=0.5).eval()
    out = net(tiny_bag(8))
    w = net.scorer.weight
    torch.testing.assert_close(out.aux_losses["l2_scorer"], 0.5 * w.pow(2).sum())
    assert out.extras["descriptor"].shape == (2, 6) and out.extras["tile_scores"].shape == (2, 10)
