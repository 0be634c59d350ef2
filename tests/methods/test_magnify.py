"""MagNets blocks: linearized sampler, ST stacks, spatial entmax, crops, ROI tree, pixel budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_lightning.methods.magnet.lin_sampler import affine_grid, lin_grid_sample
from wsi_lightning.methods.magnet.magnify import (
    MagnifyingLayer,
    STStack,
    WarmBatchNorm2d,
    canvas_box,
    child_frames,
    clip_boxes,
    pixel_count,
    pmf_to_theta,
    relative_theta,
    sample_patches,
    spatial_entmax,
    square_frame,
    tree_counts,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_image(h: int, w: int, channels: int = 3) -> torch.Tensor:
    """(1, C, h, w) low-frequency image on level-0 pixel coordinates."""
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    chans = [torch.sin(x / 23 + k) * torch.cos(y / 31 - k) + 0.1 * k for k in range(channels)]
    return torch.stack(chans)[None]


# ------------------------------------------------------------------------- lin sampler


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_matches_torch(align_corners):
    theta = torch.tensor([[0.7, 0.1, -0.2], [1.0, 0.0, 0.0], [0.05, -0.9, 0.4]])
    mats = torch.zeros(3, 2, 3)
    mats[:, 0, 0] = mats[:, 1, 1] = theta[:, 0]
    mats[:, :, 2] = theta[:, 1:]
    ref = F.affine_grid(mats, (3, 1, 11, 13), align_corners=align_corners)
    torch.testing.assert_close(affine_grid(theta, (11, 13), align_corners), ref)


@pytest.mark.parametrize("align_corners", [False, True])
def test_lin_value_and_image_gradient_equal_bilinear(align_corners):
    image = torch.randn(2, 3, 40, 50, generator=gen(0), requires_grad=True)
    grid = (1.2 * torch.rand(2, 9, 7, 2, generator=gen(1)) * 2 - 1.2).requires_grad_()  # some out
    out = lin_grid_sample(image, grid, align_corners=align_corners, generator=gen(2))
    ref = F.grid_sample(image, grid, align_corners=align_corners)
    assert out.shape == (2, 3, 9, 7)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    w = torch.randn_like(out)
    (g_lin,) = torch.autograd.grad((out * w).sum(), image)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), image)
    torch.testing.assert_close(g_lin, g_ref)


def test_lin_grid_gradient_matches_bilinear_on_smooth_image():
    image = smooth_image(200, 200)
    grid = affine_grid(torch.tensor([[0.5, 0.1, -0.1]]), (20, 20)).requires_grad_()
    (g_lin,) = torch.autograd.grad(lin_grid_sample(image, grid, generator=gen(0)).sum(), grid)
    (g_ref,) = torch.autograd.grad(F.grid_sample(image, grid, align_corners=False).sum(), grid)
    assert ((g_lin - g_ref).norm() / g_ref.norm()).item() < 0.1


def test_lin_add_intercept_adds_a_small_local_correction():
    image = smooth_image(64, 64)
    grid = affine_grid(torch.tensor([[0.8, 0.0, 0.1]]), (16, 16)).requires_grad_()
    out = lin_grid_sample(image, grid, add_intercept=True, generator=gen(0))
    diff = (out - F.grid_sample(image, grid, align_corners=False)).abs()
    assert 0 < diff.max() < 0.05


def translation_gradient_accuracy(sampler: str, texture: float, n: int = 64) -> float:
    """Fraction of n trials where d loss / d t_x points away from the loss minimum at t = 0.

    Each trial: a 256² image = a broad Gaussian blob + `texture` · per-pixel white noise; target
    = its 32² rendering at s = 1 (8x down-scaling), t = 0; the crop starts at t_x = ±[0.05, 0.3]
    (6 to 38 source pixels off). Descent moves toward 0 iff sign(grad) == sign(t_x).
    """
    s, out = 256, 32
    y, x = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    blob = torch.exp(-(x**2 + y**2) / (2 * 0.35**2))  # (S, S)
    image = blob + texture * torch.randn(n, 1, s, s, generator=gen(0))  # (n, 1, S, S)
    sign = torch.where(torch.rand(n, generator=gen(1)) < 0.5, -1.0, 1.0)
    tx = sign * (0.05 + 0.25 * torch.rand(n, generator=gen(2)))
    identity = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    target = F.grid_sample(image, affine_grid(identity, (out, out)), align_corners=False)
    theta = torch.stack([torch.ones(n), tx, torch.zeros(n)], 1).requires_grad_()
    kw = {"generator": gen(3)} if sampler == "linearized" else {}
    patch = sample_patches(image, theta, out, sampler, **kw)  # (n, 1, out, out)
    (grad,) = torch.autograd.grad(((patch - target) ** 2).sum(), theta)
    return (grad[:, 1].sign() == sign).float().mean().item()


def test_lin_gradient_stays_informative_at_8x_downscaling():
    # Control: without texture both samplers point to the minimum (the task is well posed).
    assert translation_gradient_accuracy("bilinear", texture=0.0) > 0.95
    assert translation_gradient_accuracy("linearized", texture=0.0) > 0.95
    # Faint texture: bilinear's 4-pixel gradient sees only texture (chance level); the
    # linearized fit over an output pixel's footprint still sees the blob.
    assert translation_gradient_accuracy("bilinear", texture=0.1) < 0.7
    assert translation_gradient_accuracy("linearized", texture=0.1) > 0.9


def test_lin_outside_image_is_black_with_zero_finite_gradient():
    image = torch.rand(1, 3, 16, 16)
    grid = torch.full((1, 4, 4, 2), 3.0, requires_grad=True)  # far outside: no usable sample
    out = lin_grid_sample(image, grid)
    assert torch.all(out == 0)
    (g,) = torch.autograd.grad(out.sum(), grid)
    assert torch.all(g == 0)
    with pytest.raises(ValueError, match="n_samples >= 4"):
        lin_grid_sample(image, grid, n_samples=3)


# ------------------------------------------------------------------- ST head and crops


def test_spatial_entmax_sums_to_one_and_is_sparse():
    logits = torch.randn(4, 2, 56, 56, generator=gen(0))
    pmf = spatial_entmax(logits)
    assert pmf.shape == logits.shape and torch.all(pmf >= 0)
    torch.testing.assert_close(pmf.sum((-2, -1)), torch.ones(4, 2))
    assert (pmf == 0).float().mean() > 0.5  # sparse: most pixels get exactly 0
    top = logits.flatten(-2).argmax(-1)  # (4, 2) the mode keeps the most mass
    assert torch.equal(pmf.flatten(-2).argmax(-1), top)


@pytest.mark.parametrize("tanh_on", ["marginals", "expectation"])
def test_pmf_to_theta_known_values_and_clamps(tanh_on):
    corner = torch.zeros(56, 56)
    corner[0, 55] = 1  # x = +1, y = -1
    s, tx, ty = pmf_to_theta(corner, tanh_on).tolist()
    t = math.tanh(1.0)
    assert tx == pytest.approx(t) and ty == pytest.approx(-t)
    assert s == pytest.approx(1 - t)  # 2(1 - t) from the PMF, clamped to stay inside
    uniform = torch.full((56, 56), 1 / 56**2)
    assert pmf_to_theta(uniform, tanh_on).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    pmfs = spatial_entmax(3 * torch.randn(500, 56, 56, generator=gen(0)))
    pmfs[:100] = torch.zeros(56, 56).index_put_((torch.tensor([27]), torch.tensor([28])),
                                                torch.tensor(1.0))  # point mass: s -> 0.05
    theta = pmf_to_theta(pmfs, tanh_on)
    s, t_max = theta[:, 0], theta[:, 1:].abs().amax(1)
    assert torch.all(s >= 0.05) and torch.all(s <= 1) and torch.all(t_max < 1)
    # The box stays inside the image unless that needs s < 0.05 (the lower clamp comes last).
    assert torch.all(s <= (1 - t_max).clamp_min(0.05) + 1e-6)
    assert torch.allclose(s[:100], torch.tensor(0.05))
    with pytest.raises(ValueError, match="tanh_on"):
        pmf_to_theta(uniform, "inside")


def test_grouped_st_stacks_are_independent():
    torch.manual_seed(0)
    stack = STStack(groups=2).eval()
    single = STStack(groups=1)
    assert sum(p.numel() for p in stack.parameters()) == 2 * sum(
        p.numel() for p in single.parameters())
    x = torch.rand(2, 6, 20, 20)
    y = x.clone()
    y[:, 3:] = torch.rand(2, 3, 20, 20)  # change group 1's input only
    out_x, out_y = stack(x), stack(y)
    assert out_x.shape == (2, 2, 20, 20)
    torch.testing.assert_close(out_x[:, 0], out_y[:, 0])
    assert not torch.allclose(out_x[:, 1], out_y[:, 1])


@pytest.mark.parametrize("n_nodes,n_patches,freeze_first,out_size,sampler", [
    (1, 3, False, 28, "linearized"),
    (3, 2, True, 112, "bilinear"),  # frozen first child; the last layer's 4x larger output
])
def test_magnifying_layer_shapes_and_gradients(n_nodes, n_patches, freeze_first, out_size,
                                               sampler):
    torch.manual_seed(0)
    layer = MagnifyingLayer(n_nodes, n_patches, out_size=out_size, freeze_first=freeze_first,
                            sampler=sampler)
    b, size = 2, 28  # the paper's 56 / 112 / 224 halved for speed; the layer is size-agnostic
    images = torch.rand(b, n_nodes, 3, size, size)
    sources = torch.rand(b, n_nodes, 3, 2 * size, 2 * size)
    out = layer(images, sources)
    p_learned = n_patches - int(freeze_first)
    assert out.patches.shape == (b, n_nodes, n_patches, 3, out_size, out_size)
    assert out.theta.shape == (b, n_nodes, n_patches, 3)
    assert out.pmf.shape == (b, n_nodes, p_learned, size, size)
    assert torch.isfinite(out.patches).all()
    torch.testing.assert_close(out.pmf.sum((-2, -1)), torch.ones(b, n_nodes, p_learned))
    assert (out.pmf == 0).float().mean() > 0.5  # the ST head's entmax map is sparse
    s = out.theta[..., 0]
    room = (1 - out.theta[..., 1:].abs().amax(-1)).clamp_min(0.05)
    assert torch.all(s >= 0.05) and torch.all(s <= room + 1e-6)
    if freeze_first:
        assert torch.all(out.theta[:, :, 0] == torch.tensor([1.0, 0.0, 0.0]))
    # Child p of node n is its source sampled at its crop (the value is bilinear either way).
    src = sources[:, :, None].expand(-1, -1, n_patches, -1, -1, -1).flatten(0, 2)
    ref = sample_patches(src, out.theta.detach().flatten(0, 2), out_size, "bilinear")
    torch.testing.assert_close(out.patches.flatten(0, 2), ref)
    loss = (out.patches * torch.randn_like(out.patches)).sum()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_warm_batchnorm_is_a_cumulative_average_then_the_usual_ema():
    torch.manual_seed(0)
    warm, plain = WarmBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    xs = [torch.randn(4, 3, 5, 5) * (k + 1) + k for k in range(15)]
    for x in xs[:5]:
        warm(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs[:5]]).mean(0)
    variances = torch.stack([x.var((0, 2, 3)) for x in xs[:5]]).mean(0)
    assert torch.allclose(warm.running_mean, means, atol=1e-5)
    assert torch.allclose(warm.running_var, variances, atol=1e-4)
    assert warm.momentum == 0.1
    # past 1 / momentum batches it is the plain exponential average, from the same state
    for x in xs[5:10]:
        warm(x)
    plain.load_state_dict(warm.state_dict())
    for x in xs[10:]:
        warm(x), plain(x)
    assert torch.allclose(warm.running_mean, plain.running_mean)
    assert torch.allclose(warm.running_var, plain.running_var)
    assert int(warm.num_batches_tracked) == 15


def test_magnifying_layer_evaluates_as_it_trains_after_a_few_steps():
    """After 3 training steps on a batch, evaluation crops of that batch are the training
    crops (plain BatchNorm: running statistics still mostly the initial 0 / 1, flat maps)."""
    torch.manual_seed(0)
    layer = MagnifyingLayer(1, 2, out_size=8)
    images, sources = torch.rand(4, 1, 3, 16, 16, generator=gen(1)), torch.rand(4, 1, 3, 32, 32, generator=gen(2))
    with torch.no_grad():
        for _ in range(3):
            train_theta = layer(images, sources).theta
        layer.eval()
        eval_theta = layer(images, sources).theta
    assert torch.allclose(eval_theta, train_theta, atol=2e-2)
    plain = MagnifyingLayer(1, 2, out_size=8)
    for m in plain.modules():
        if isinstance(m, WarmBatchNorm2d):
            m.__class__ = torch.nn.BatchNorm2d
    with torch.no_grad():
        for _ in range(3):
            plain_train = plain(images, sources).theta
        plain.eval()
        plain_eval = plain(images, sources).theta
    assert (plain_eval[..., 0] - plain_train[..., 0]).abs().max() > 0.1  # what the warm start fixes


def test_magnifying_layer_checks_its_arguments():
    with pytest.raises(ValueError, match="freeze_first"):
        MagnifyingLayer(1, 1, freeze_first=True)
    with pytest.raises(ValueError, match="tanh_on"):
        MagnifyingLayer(1, 2, tanh_on="both")
    with pytest.raises(ValueError, match="sampler"):
        MagnifyingLayer(1, 2, sampler="nearest")
    layer = MagnifyingLayer(2, 2)
    with pytest.raises(ValueError, match=r"expected \(B, 2, C, H, W\)"):
        layer(torch.rand(1, 3, 3, 56, 56), torch.rand(1, 3, 3, 112, 112))


# ------------------------------------------------------------------------- ROI tree


def test_child_frames_round_trip_and_composition():
    frames = square_frame(torch.tensor([[100.0, 40.0, 900.0, 540.0], [0.0, 0.0, 64.0, 64.0]]))
    theta = torch.stack([torch.rand(2, 3, generator=gen(0)) * 0.9 + 0.05,
                         torch.rand(2, 3, generator=gen(1)) - 0.5,
                         torch.rand(2, 3, generator=gen(2)) - 0.5], -1)  # (2, 3, 3)
    kids = child_frames(frames, theta)  # (2, 3, 4)
    assert kids.shape == (2, 3, 4)
    torch.testing.assert_close(relative_theta(frames, kids), theta)
    w, h = kids[..., 2] - kids[..., 0], kids[..., 3] - kids[..., 1]
    torch.testing.assert_close(w, h)  # children of square frames are square
    # Two levels compose as one crop: s = s1·s2, t = t1 + s1·t2.
    grand = child_frames(kids[:, 0], theta)  # (2, 3, 4)
    s1, t1 = theta[:, :1, :1], theta[:, :1, 1:]
    direct = torch.cat([s1 * theta[..., :1], t1 + s1 * theta[..., 1:]], -1)
    torch.testing.assert_close(relative_theta(frames, grand), direct)


def test_layer1_frame_padding_and_canvas():
    slide = torch.tensor([0.0, 0.0, 512.0, 256.0])  # level-0 (x0, y0, x1, y1), wide slide
    frame = square_frame(slide)
    torch.testing.assert_close(frame, torch.tensor([0.0, -128.0, 512.0, 384.0]))
    content = clip_boxes(frame, slide)
    torch.testing.assert_close(content, slide)
    torch.testing.assert_close(canvas_box(frame, content, 112), torch.tensor([0.0, 28, 112, 84]))
    corner = child_frames(frame, torch.tensor([[0.5, -0.5, -0.5]]))[0]  # top-left quarter
    torch.testing.assert_close(clip_boxes(corner, slide), torch.tensor([0.0, 0, 256, 128]))
    torch.testing.assert_close(canvas_box(corner, clip_boxes(corner, slide), 112),
                               torch.tensor([0.0, 56, 112, 112]))  # upper half is padding


def render(level0: torch.Tensor, frame: torch.Tensor, size: int) -> torch.Tensor:
    """Read a level-0 frame at size x size, black outside the image: (1, C, H0, W0) -> (1, C, n, n)."""
    h0, w0 = level0.shape[-2:]
    u = (torch.arange(size) + 0.5) / size  # (n,) pixel centres in [0, 1]
    xs = 2 * (frame[0] + u * (frame[2] - frame[0])) / w0 - 1  # (n,) normalised level-0 x
    ys = 2 * (frame[1] + u * (frame[3] - frame[1])) / h0 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]  # (1, n, n, 2)
    return F.grid_sample(level0, grid, align_corners=False)


def test_child_sampled_from_parent_source_equals_level0_read():
    level0 = smooth_image(256, 384)  # (1, 3, H0, W0)
    frame = square_frame(torch.tensor([0.0, 0.0, 384.0, 256.0]))  # layer-1 frame, padded
    source = render(level0, frame, 112)  # I' with black bands top and bottom
    assert torch.all(source[..., :10, :] == 0) and torch.all(source[..., -10:, :] == 0)
    theta = torch.tensor([[0.4, 0.3, -0.2], [0.2, -0.5, 0.25]])
    kids = child_frames(frame, theta)  # (2, 4)
    patches = sample_patches(source.expand(2, -1, -1, -1), theta, 56, generator=gen(0))
    for k in range(2):
        direct = render(level0, kids[k], 56)[0]
        assert (patches[k] - direct).abs().max() < 0.03


# ---------------------------------------------------------------------- pixel budget


def test_pixel_counts_match_the_paper():
    assert tree_counts((3, 2, 3)) == ([1, 3, 6], 18)
    assert tree_counts((3, 2, 3, 2)) == ([1, 3, 6, 18], 36)
    assert pixel_count((3, 2, 3)) == 2_803_584
    assert pixel_count((3, 2, 3, 2)) == 5_682_432
    assert pixel_count((3, 2, 3), source_size=112) == 2_803_584 + 10 * 37_632
    assert pixel_count((3, 2, 3, 2), source_size=112) == 5_682_432 + 28 * 37_632
    for p, n_stacks in (((3, 2, 3), 27), ((3, 2, 3, 2), 63)):
        n_in, _ = tree_counts(p)
        assert sum(n * pl for n, pl in zip(n_in, p, strict=True)) == n_stacks
