from __future__ import annotations

import pytest
import torch

from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.cs_mil import CSMILNet


def ms_bag(n: int = 9, s: int = 3, d: int = 8) -> Bag:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 5:] = False  # masked placeholders / padding
    x = torch.randn(2, n, s, d, generator=g) * mask[..., None, None]
    return Bag(x, mask, torch.zeros(2, n, 2, dtype=torch.long), {}, ["a", "b"])


def test_softmax_normalises_cross_scale_scores():
    bag = ms_bag()
    r_none = CSMILNet(8, {"y": 2}, cs_norm="none").eval()(bag).cross_scale
    r_soft = CSMILNet(8, {"y": 2}, cs_norm="softmax").eval()(bag).cross_scale
    valid = bag.mask
    torch.testing.assert_close(r_soft[valid].sum(-1), torch.ones(int(valid.sum())))
    assert not torch.allclose(r_none[valid].sum(-1), torch.ones(int(valid.sum())))


def test_sharing_switch_changes_parameters():
    shared, separate = CSMILNet(8, {"y": 2}, shared=True), CSMILNet(8, {"y": 2}, shared=False)
    assert len(shared.embed) == 1 and len(separate.embed) == 3
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    emb = sum(p.numel() for p in shared.embed.parameters()) + sum(p.numel() for p in shared.cs.parameters())
    assert n_sep - n_shared == 2 * emb


def test_tanh_bounds_hidden_activation():
    net = CSMILNet(8, {"y": 2}, cs_act="tanh")
    assert isinstance(net.cs[0][1], torch.nn.Tanh)
    assert isinstance(CSMILNet(8, {"y": 2}).cs[0][1], torch.nn.ReLU)


def test_masked_placeholders_get_zero_attention_and_bad_input():
    bag = ms_bag()
    out = CSMILNet(8, {"y": 2}).eval()(bag)
    assert (out.attention[1, 5:] == 0).all() and (out.cross_scale[1, 5:] == 0).all()
    with pytest.raises(ValueError, match="multi-scale bags"):
        CSMILNet(8, {"y": 2})(Bag(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, 2)))
    with pytest.raises(ValueError, match="cs_norm"):
        CSMILNet(8, {"y": 2}, cs_norm="sparsemax")
