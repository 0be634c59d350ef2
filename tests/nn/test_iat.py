"""IATModel / IAMBlock: shapes, batching with padding, attention, instance loss, gradients."""

from __future__ import annotations

import pytest
import torch

from wsi_lightning.nn.iat import IAMBlock, IATModel, top_bottom_k
from wsi_lightning.nn.smooth_svm import smooth_top1_svm

TINY = dict(feat_in=12, hidden_dims=(16, 24, 8, 16), final_dim=16, n_classes=2, k_sample=3,
            attn_dim=10, gate_dim=6, num_landmarks=8, conv_kernel=5)


def padded(bags: list[torch.Tensor], n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags (n_i, D) into (B, n_max, D) with random garbage padding, and the mask."""
    x = 30 * torch.randn(len(bags), n_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return x, mask


@pytest.fixture
def model() -> IATModel:
    torch.manual_seed(0)
    return IATModel(**TINY)


def test_shapes_and_attention(model):
    x, mask = padded([torch.randn(n, 12) for n in (20, 7, 13)], 20)
    out = model.eval()(x, mask, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2)
    assert out.attention.shape == out.attention_raw.shape == (3, 20)
    assert out.embedding.shape == (3, 16)
    assert out.instance_loss.shape == () and torch.isfinite(out.instance_loss)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(3))
    assert torch.all(out.attention[~mask] == 0)
    assert torch.all(torch.isneginf(out.attention_raw[~mask]))
    assert torch.isfinite(out.attention_raw[mask]).all()
    assert model(x, mask).instance_loss is None
    blocks = out.block_attention  # (B, n_blocks, N): every block's map, the last one = attention
    assert blocks.shape == (3, len(model.blocks), 20)
    torch.testing.assert_close(blocks[:, -1], out.attention)
    torch.testing.assert_close(blocks.sum(-1), torch.ones(3, len(model.blocks)))
    assert torch.all(blocks.transpose(1, 2)[~mask] == 0)


def test_batched_with_padding_equals_one_slide_at_a_time(model):
    torch.manual_seed(1)
    lengths = [29, 9, 17, 4]  # 9, 17: empty Nyström landmarks; 4: n < 2k and n < m
    bags = [torch.randn(n, 12) for n in lengths]
    labels = torch.tensor([1, 0, 1, 0])
    model.eval()
    x, mask = padded(bags, 33)
    out = model(x, mask, labels=labels)
    inst_alone = []
    for i, bag in enumerate(bags):
        alone = model(bag[None], labels=labels[i : i + 1])
        n = len(bag)
        torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.attention[i, :n], alone.attention[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.attention_raw[i, :n], alone.attention_raw[0], atol=1e-5,
                                   rtol=1e-4)
        inst_alone.append(alone.instance_loss)
    torch.testing.assert_close(out.instance_loss, torch.stack(inst_alone).mean(), atol=1e-5,
                               rtol=1e-4)


def test_top_bottom_k_and_instance_loss_use_exact_sets(model):
    scores = torch.tensor([[0.5, 3.0, -2.0, 1.0, float("-inf"), -1.0, 2.0, 0.0, float("-inf")]])
    mask = torch.isfinite(scores)
    u = torch.randn(1, 9, 10)
    top, bottom = top_bottom_k(scores[0, mask[0]], 3)
    valid = mask[0].nonzero().squeeze(1)
    assert set(valid[top].tolist()) == {1, 6, 3}  # scores 3, 2, 1
    assert set(valid[bottom].tolist()) == {2, 5, 7}  # scores -2, -1, 0 (padding excluded)
    for y in (0, 1):
        clf = model.instance_classifiers[y]
        inst_u = u[0, [1, 6, 3, 2, 5, 7]]  # (6, 10) top-3 then bottom-3
        expected = smooth_top1_svm(clf(inst_u), torch.tensor([1, 1, 1, 0, 0, 0]))
        got = model.instance_loss(scores, u, mask, torch.tensor([y]))
        torch.testing.assert_close(got, expected)
    # unknown labels are skipped
    assert float(model.instance_loss(scores, u, mask, torch.tensor([-1]))) == 0.0


def test_every_parameter_gets_a_gradient(model):
    torch.manual_seed(2)
    x, mask = padded([torch.randn(n, 12) for n in (15, 11)], 15)
    out = model.train()(x, mask, labels=torch.tensor([0, 1]))
    (torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1]))
     + out.instance_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith("score.c.bias"):  # softmax is shift-invariant: its grad is ~0
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_block_combination_is_four_weights_and_a_bias(model):
    assert model.combine.weight.shape == (1, 4)
    assert model.combine.bias.shape == (1,)
    assert len(model.blocks) == 4


def test_default_sizes_match_the_paper():
    block = IAMBlock(1536, 512)
    assert block.attn.heads == 8 and block.attn.dim_head == 64
    assert block.attn.num_landmarks == 256 and block.attn.pinv_iterations == 6
    assert block.attn.res_conv.kernel_size == (33, 1)
    assert block.residual.omega == pytest.approx(1.759567, abs=1e-6)
    assert IAMBlock(16, 16, admin=False).residual.omega == 1.0
    with pytest.raises(ValueError, match="divisible by heads"):
        IAMBlock(16, 12)


def test_ce_instance_loss_and_plain_residual():
    torch.manual_seed(0)
    m = IATModel(**TINY, inst_loss="ce", admin=False, gated=False)
    out = m(torch.randn(1, 10, 12), labels=torch.tensor([1]))
    assert torch.isfinite(out.instance_loss)
    with pytest.raises(ValueError, match="inst_loss"):
        IATModel(**TINY, inst_loss="focal")
