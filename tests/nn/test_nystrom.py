"""Nyström attention: exactness with m = N, mask invariance, pinv convergence; scaled residual."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_lightning.nn.nystrom import (
    NystromAttention,
    iterative_pinv,
    nystrom_attention,
    segment_landmarks,
)
from wsi_lightning.nn.residual import ScaledResidual, admin_omega


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ) v, with q already scaled: (B, H, N, d)."""
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_output_shape_and_padding_zero():
    torch.manual_seed(0)
    attn = NystromAttention(12, heads=3, dim_head=4, num_landmarks=4, conv_kernel=5).eval()
    x = torch.randn(2, 11, 12)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    out = attn(x, mask)
    assert out.shape == (2, 11, 12)
    assert torch.all(out[1, 7:] == 0)


def test_pinv_converges_on_well_conditioned_matrix():
    torch.manual_seed(0)
    a = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(iterative_pinv(a, 6), torch.linalg.pinv(a), atol=1e-10, rtol=0)
    # more iterations than needed stay at the fixed point
    torch.testing.assert_close(iterative_pinv(a, 12), torch.linalg.pinv(a), atol=1e-10, rtol=0)


def test_landmarks_equal_to_n_give_exact_attention():
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 8, 16
    q = 0.6 * torch.randn(b, h, n, d, dtype=torch.float64)  # diagonal-dominant q kᵀ:
    k = q.clone()  # well-conditioned landmark kernel
    v = torch.randn(b, h, n, d, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    out = nystrom_attention(q, k, v, mask, num_landmarks=n, pinv_iterations=6)
    torch.testing.assert_close(out, exact_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_landmarks_equal_to_n_exact_with_padding():
    torch.manual_seed(1)
    q = 0.6 * torch.randn(1, 2, 6, 16, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 16, dtype=torch.float64)
    qp = torch.cat([q, torch.randn(1, 2, 3, 16, dtype=torch.float64)], 2)  # 3 pads of noise
    vp = torch.cat([v, torch.randn(1, 2, 3, 16, dtype=torch.float64)], 2)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    out = nystrom_attention(qp, qp, vp, mask, num_landmarks=6)
    torch.testing.assert_close(out[:, :, :6], exact_attention(q, q, v), atol=1e-6, rtol=1e-6)


def test_matches_direct_formula_with_fewer_landmarks():
    """Paper Eq. 14 written out with reshape-based segment means (N a multiple of m)."""
    torch.manual_seed(0)
    b, h, n, d, m = 2, 3, 12, 5, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    q_l = q.view(b, h, m, n // m, d).mean(3)  # (B, H, m, d)
    k_l = k.view(b, h, m, n // m, d).mean(3)
    sm = torch.softmax
    ref = (sm(q @ k_l.transpose(-1, -2), -1)
           @ iterative_pinv(sm(q_l @ k_l.transpose(-1, -2), -1), 6)
           @ sm(q_l @ k.transpose(-1, -2), -1) @ v)
    out = nystrom_attention(q, k, v, torch.ones(b, n, dtype=torch.bool), m)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_segment_landmarks_are_means_of_valid_tokens():
    q = torch.arange(9, dtype=torch.float64).view(1, 1, 9, 1)  # n = 9 valid tokens, m = 4 -> l = 3
    q = torch.cat([q, torch.full((1, 1, 3, 1), 100.0, dtype=torch.float64)], 2)  # 3 pads
    mask = torch.tensor([[True] * 9 + [False] * 3])
    q_l, k_l, valid = segment_landmarks(q, q, mask, 4)
    assert q_l.flatten().tolist() == [1.0, 4.0, 7.0, 0.0]  # segments {0,1,2} {3,4,5} {6,7,8} {}
    assert valid.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("residual_conv", [True, False])
def test_padded_equals_unpadded(residual_conv):
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=2, dim_head=8, num_landmarks=4,
                            residual_conv=residual_conv, conv_kernel=7).eval()
    lengths = [13, 5, 9, 3]  # 9 -> empty landmarks; 3 < m
    bags = [torch.randn(n, 16) for n in lengths]
    n_max = 17
    x = torch.zeros(len(bags), n_max, 16)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        x[i, len(bag):] = 50 * torch.randn(n_max - len(bag), 16)  # garbage in the padding
        mask[i, : len(bag)] = True
    out = attn(x, mask)
    for i, bag in enumerate(bags):
        alone = attn(bag[None])[0]
        torch.testing.assert_close(out[i, : len(bag)], alone, atol=1e-5, rtol=1e-4)


def test_non_contiguous_mask_equals_compact_bag():
    torch.manual_seed(0)
    attn = NystromAttention(8, heads=2, dim_head=4, num_landmarks=3, conv_kernel=5).eval()
    bag = torch.randn(7, 8)
    x = torch.randn(1, 10, 8)
    keep = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    x[0, keep] = bag
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, keep] = True
    out = attn(x, mask)
    torch.testing.assert_close(out[0, keep], attn(bag[None])[0], atol=1e-5, rtol=1e-4)
    assert torch.all(out[0, ~mask[0]] == 0)


def test_gradients_finite():
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=4, dim_head=4, num_landmarks=4, conv_kernel=5, dropout=0.1)
    x = torch.randn(2, 10, 16, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    attn(x, mask).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1, 6:] == 0)  # padding gets no gradient
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_admin_omega_formula():
    n = 8
    expected = math.sqrt((n + 1) / math.log(n + 1) - 1)
    assert admin_omega(n) == pytest.approx(expected)
    assert admin_omega(n) == pytest.approx(1.759567, abs=1e-6)
    assert admin_omega(n, "1") == pytest.approx(math.sqrt(8))
    assert admin_omega(n, "n") == 1.0
    assert ScaledResidual(n).omega == pytest.approx(expected)
    with pytest.raises(ValueError, match="output_change_scale"):
        admin_omega(n, "O(n^2)")


def test_scaled_residual_forward_and_plain():
    x, fx = torch.randn(3, 4), torch.randn(3, 4)
    res = ScaledResidual(8)
    torch.testing.assert_close(res(x, fx), res.omega * x + fx)
    plain = ScaledResidual(8, plain=True)
    assert plain.omega == 1.0
    torch.testing.assert_close(plain(x, fx), x + fx)
