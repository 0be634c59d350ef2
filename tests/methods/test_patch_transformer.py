"""Patch Transformer: per-head parameters, no patch mixing (Eq. 1), MTA, the SDPA switch, masks."""

from __future__ import annotations

import math

import pytest
import torch

from tests.methods_helpers import tiny_bag
from wsi_lightning.data.batch import Bag
from wsi_lightning.methods.patch_transformer import PatchTransformerNet
from wsi_lightning.methods.patch_transformer.block import MultiTagAttention, PatchTransformation

D = 12
TAGS = {"stain": 3, "species": 2, "organ": 4}


def feats(b: int = 2, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[b - 1, n - 2:] = False  # the last bag is padded
    return torch.randn(b, n, D, generator=g).masked_fill(~mask[..., None], 0.0), mask


def test_each_head_has_its_own_attention_and_every_head_learns():
    torch.manual_seed(0)
    pt = PatchTransformation(D, heads=3, hidden=5)
    assert pt.att.U.shape == (3, D, 5) and pt.att.w.shape == (3, 5)  # h separate (U_j, w_j)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(pt.att.U[i], pt.att.U[j])
            assert not torch.allclose(pt.att.w[i], pt.att.w[j])
    v, mask = feats()
    out, a = pt(v, mask)
    assert a.shape == (2, 3, 7) and not torch.allclose(a[:, 0], a[:, 1])  # heads attend differently
    out.sum().backward()
    for j in range(3):  # each head's own parameters get a gradient
        assert pt.att.U.grad[j].abs().sum() > 0 and pt.att.w.grad[j].abs().sum() > 0
    assert pt.W.weight.shape == (D, 3 * D)  # W: hD -> D


def test_ilse_pt_scales_patches_and_never_mixes_them():
    """With uniform attention (score vectors zeroed), patch i's output must not move when other
    patches change (Eq. 1 scales patches); SDPA with uniform attention averages them, so it moves."""
    v, _ = feats(b=1, n=6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    other = v.clone()
    other[0, 1:] += torch.randn(5, D)  # every patch but patch 0 changes
    pt = PatchTransformation(D, heads=2, hidden=4)
    with torch.no_grad():
        pt.att.w.zero_()
        a_out, _ = pt(v, mask)
        b_out, _ = pt(other, mask)
    torch.testing.assert_close(a_out[0, 0], b_out[0, 0], rtol=0, atol=0)
    sdpa = PatchTransformation(D, heads=2, hidden=4, attention="sdpa")
    with torch.no_grad():
        sdpa.qk.weight.zero_(), sdpa.qk.bias.zero_()
        assert not torch.allclose(sdpa(v, mask)[0][0, 0], sdpa(other, mask)[0][0, 0])


@pytest.mark.parametrize("norm", ["softmax", "count"])
def test_other_patches_reach_a_patch_only_through_h_attention_scalars(norm: str):
    """d V'_i / d v_k (k != i) has rank <= h for the PT module (only the h softmax weights a_ji
    depend on v_k); scaled dot-product attention mixes v_k in directly (rank ~ D)."""
    torch.manual_seed(0)
    v, _ = feats(b=1, n=5)
    mask = torch.ones(1, 5, dtype=torch.bool)
    heads = 2

    def jac_rank(pt: PatchTransformation) -> int:
        def out_i(vk: torch.Tensor) -> torch.Tensor:
            x = torch.cat([v[:, :3], vk[None, None], v[:, 4:]], 1)  # patch 3 varies
            return pt(x, mask)[0][0, 0]  # V'_0: (D,)

        j = torch.autograd.functional.jacobian(out_i, v[0, 3])  # (D, D)
        return int(torch.linalg.matrix_rank(j, atol=1e-6))

    assert 1 <= jac_rank(PatchTransformation(D, heads, 4, norm=norm)) <= heads
    assert jac_rank(PatchTransformation(D, heads, 4, attention="sdpa")) > heads


def test_sdpa_switch_is_masked_scaled_dot_product_attention():
    torch.manual_seed(0)
    v, mask = feats()
    ilse = PatchTransformation(D, heads=3, hidden=4)
    sdpa = PatchTransformation(D, heads=3, hidden=4, attention="sdpa")
    sdpa.W.load_state_dict(ilse.W.state_dict())
    out, a = sdpa(v, mask)
    assert a is None and not torch.allclose(out, ilse(v, mask)[0])
    q, k = sdpa.qk(v).view(2, 7, 2, 3, 4).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    s = (q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(~mask[:, None, None], float("-inf"))
    f = torch.softmax(s, -1) @ v[:, None]  # (B, h, N, D)
    ref = torch.relu(v + sdpa.W(f.permute(0, 2, 1, 3).reshape(2, 7, 3 * D))) * mask[..., None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        PatchTransformation(D, attention="mha")


@pytest.mark.parametrize("attention", ["ilse", "sdpa"])
@pytest.mark.parametrize("norm", ["softmax", "count"])
def test_padding_is_ignored(attention: str, norm: str):
    torch.manual_seed(0)
    pt = PatchTransformation(D, heads=2, hidden=4, attention=attention, norm=norm)
    v, mask = feats(b=2, n=5)
    mask[1] = True
    big = torch.cat([v, 1e3 * torch.randn(2, 4, D)], 1)  # 4 garbage padded patches
    big_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        small_out, small_a = pt(v, mask)
        big_out, big_a = pt(big, big_mask)
    torch.testing.assert_close(small_out, big_out[:, :5], rtol=1e-5, atol=1e-5)
    assert (big_out[:, 5:] == 0).all()
    if attention == "ilse":
        torch.testing.assert_close(small_a, big_a[..., :5], rtol=1e-5, atol=1e-6)
        assert (big_a[..., 5:] == 0).all()


def test_count_norm_is_bag_size_invariant_and_softmax_is_not():
    torch.manual_seed(0)
    patch = torch.randn(1, 1, D)
    one, many = patch, patch.expand(1, 20, D)  # a bag of one patch vs the same patch 20 times
    m1, m20 = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)
    for norm, same in (("count", True), ("softmax", False)):
        pt = PatchTransformation(D, heads=2, hidden=4, norm=norm)
        with torch.no_grad():
            a, b = pt(one, m1)[0][0, 0], pt(many, m20)[0][0, 0]
        assert torch.allclose(a, b, atol=1e-6) == same, norm


def test_mta_one_attention_per_tag_summing_to_one_over_valid_patches():
    torch.manual_seed(0)
    mta = MultiTagAttention(D, TAGS, hidden=6)
    v, mask = feats()
    logits, a = mta(v, mask)
    assert a.shape == (2, 3, 7) and {t: x.shape for t, x in logits.items()} == {
        t: torch.Size([2, c]) for t, c in TAGS.items()}
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3))
    assert (a[1, :, 5:] == 0).all()
    assert not torch.allclose(a[:, 0], a[:, 1]) and not torch.allclose(a[:, 1], a[:, 2])
    t = torch.einsum("bkn,bnd->bkd", a, v)  # tag k's slide vector feeds only tag k's head
    torch.testing.assert_close(logits["organ"], mta.heads["organ"](t[:, 2]))


def test_net_switches_give_the_table_2_rows():
    bag = tiny_bag(D)
    full = PatchTransformerNet(D, TAGS, attn_dim=4)(bag)
    assert full.attention.shape == (2, 3, 10) and full.extras["pt_attention"].shape == (2, 3, 10)
    only_mta = PatchTransformerNet(D, TAGS, heads=0, attn_dim=4)
    assert only_mta.pt is None and only_mta(bag).attention.shape == (2, 3, 10)
    one_head = PatchTransformerNet(D, TAGS, heads=1, mta=False, attn_dim=4)
    out = one_head(bag)
    assert out.attention.shape == (2, 10) and out.extras["pt_attention"].shape == (2, 1, 10)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2))
    mean = PatchTransformerNet(D, TAGS, heads=1, mta=False, readout="mean")(bag)
    assert mean.attention is None and set(mean.logits) == set(TAGS)
    sdpa = PatchTransformerNet(D, TAGS, attention="sdpa", attn_dim=4)(bag)
    assert "pt_attention" not in sdpa.extras and sdpa.attention.shape == (2, 3, 10)
    for bad in ({"readout": "max"}, {"attention": "linear"}, {"heads": -1}, {"pt_norm": "l1"}):
        with pytest.raises(ValueError):
            PatchTransformerNet(D, TAGS, **bad)


def test_empty_bag_gives_finite_output():
    bag = Bag(torch.zeros(1, 4, D), torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, 2, dtype=torch.long))
    for kw in ({}, {"attention": "sdpa"}, {"heads": 1, "mta": False}):
        out = PatchTransformerNet(D, TAGS, attn_dim=4, **kw)(bag)
        assert all(torch.isfinite(x).all() for x in out.logits.values())
