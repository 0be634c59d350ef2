"""Linearized multi-sampling (Jiang et al., ICCV 2019): a grid sampler with useful gradients.

Bilinear sampling differentiates an output pixel w.r.t. its sampling point through the 4 source
pixels around it. When the grid down-scales the source strongly (an 8x zoom-out reads 1 of every
8x8 source pixels), that gradient describes the image at a scale far finer than the output's
pixel footprint, and its sign is close to random on textured images.

Linearized multi-sampling keeps the bilinear *value* but replaces the *gradient w.r.t. the grid*
by the slope of a local linear model fitted to several samples around each sampling point::

    1. copy 0 of the grid is the true grid; copies 1..K-1 add Gaussian jitter of std
       radius / (w, h) (the output size, normalised units) plus, with push_away, std
       2 / (W, H) (one source pixel), so samples spread over an output pixel's footprint;
    2. sample the image bilinearly at all K grids, with the grids detached;
    3. per output pixel and channel, fit ΔI ≈ Δx·g_x + Δy·g_y + b by least squares over the
       K-1 (offset, intensity difference) pairs relative to the centre sample; auxiliary
       samples outside [-1, 1] are left out; the 3x3 normal matrix is inverted in closed form
       and singular fits (or NaNs) give 0;
    4. out = centre + G_stopᵀ·(grid - grid_stop) [+ b_stop], so ∂out/∂grid = (g_x, g_y).

Deviations from the reference implementation:
    - The forward value is exactly the bilinear sample by default (``add_intercept=False``);
      the reference adds the fitted intercept b (its ``fixed_bias=False``), a small local
      smoothing of the value. ``add_intercept=True`` reproduces that.
    - Out-of-image auxiliary samples get weight 0 in a weighted least-squares fit (the
      reference multiplies columns of the unweighted pseudo-inverse by a mask on offsets).
    - Offsets are measured in units of the jitter std before the fit (a well-conditioned
      normal matrix in float32), and the slopes rescaled after; the solution is the same.
    - The image is sampled once per call (the K grids stacked along the height), not copied
      K times; ``generator`` makes the jitter reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def affine_grid(theta: torch.Tensor, size: tuple[int, int],
                align_corners: bool = False) -> torch.Tensor:
    """Sampling grid of an isotropic scale-and-translate transform.

    Equals ``F.affine_grid([[s, 0, t_x], [0, s, t_y]], (B, 1, h, w), align_corners)``: output
    pixel (i, j) reads the source at ``(s·x_j + t_x, s·y_i + t_y)``, where x_j, y_i are the
    normalised pixel-centre coordinates of the output.

    Args:
        theta: (B, 3) rows ``(s, t_x, t_y)`` in normalised source coordinates.
        size: output ``(h, w)``.
        align_corners: as in ``F.grid_sample``; must match the sampler's.

    Returns:
        (B, h, w, 2) grid, last dim ``(x, y)``.
    """
    h, w = size
    kw = dict(dtype=theta.dtype, device=theta.device)
    if align_corners:
        ys, xs = torch.linspace(-1, 1, h, **kw), torch.linspace(-1, 1, w, **kw)
    else:
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, **kw)  # pixel centres
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, **kw)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2)
    s, t = theta[:, 0, None, None, None], theta[:, None, None, 1:]  # (B,1,1,1), (B,1,1,2)
    return s * base + t  # (B, h, w, 2)


def _jittered_grids(grid: torch.Tensor, src_hw: tuple[int, int], n_samples: int, radius: float,
                    push_away: bool, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached grid copies, copy 0 exact and copies 1..K-1 jittered.

    Returns:
        (B, K, h, w, 2) grids and the (2,) total jitter std per axis.
    """
    b, h, w, _ = grid.shape
    g = grid.detach()
    shape = (b, n_samples - 1, h, w, 2)
    std = g.new_tensor([radius / w, radius / h])  # (2,) output-footprint jitter, normalised
    noise = torch.randn(shape, generator=generator, dtype=g.dtype, device=g.device) * std
    if push_away:
        least = g.new_tensor([2.0 / src_hw[1], 2.0 / src_hw[0]])  # (2,) one source pixel
        noise = noise + torch.randn(shape, generator=generator, dtype=g.dtype,
                                    device=g.device) * least
        std = (std**2 + least**2).sqrt()
    return torch.cat([g[:, None], g[:, None] + noise], 1), std  # (B, K, h, w, 2), (2,)


def _fit_slopes(d_xy: torch.Tensor, d_int: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least squares ``ΔI ≈ Δx·g_x + Δy·g_y + b`` per pixel and channel.

    The symmetric 3x3 normal matrix (divided by the weight sum) is inverted in closed form by
    cofactors, elementwise over pixels; fits with ``det <= eps`` (fewer than 3 usable samples,
    collinear offsets) and NaNs give 0.

    Args:
        d_xy: (B, 2, K-1, h, w) offsets (x, y) of the auxiliary samples from the centre.
        d_int: (B, C, K-1, h, w) intensity differences to the centre sample.
        weight: (B, K-1, h, w) 1 for usable samples, 0 for masked ones.
        eps: determinant threshold.

    Returns:
        g_x, g_y, b, each (B, C, h, w).
    """
    n = weight.sum(1).clamp_min(1)  # (B, h, w)
    dx, dy = d_xy[:, 0] * weight, d_xy[:, 1] * weight  # (B, K-1, h, w) each, masked
    a, bb, c = (dx * d_xy[:, 0]).sum(1) / n, (dx * d_xy[:, 1]).sum(1) / n, dx.sum(1) / n
    d, e, f = (dy * d_xy[:, 1]).sum(1) / n, dy.sum(1) / n, weight.sum(1) / n  # (B, h, w)
    c00, c01, c02 = d * f - e * e, c * e - bb * f, bb * e - c * d  # cofactors, (B, h, w)
    c11, c12, c22 = a * f - c * c, bb * c - a * e, a * d - bb * bb
    det = a * c00 + bb * c01 + c * c02  # (B, h, w)
    ok = det > eps
    inv_det = torch.where(ok, 1 / torch.where(ok, det, torch.ones_like(det)), 0.0)[:, None]
    rx = (d_int * dx[:, None]).sum(2) / n[:, None]  # (B, C, h, w); dx, dy already weighted
    ry = (d_int * dy[:, None]).sum(2) / n[:, None]
    r1 = (d_int * weight[:, None]).sum(2) / n[:, None]
    gx = (c00[:, None] * rx + c01[:, None] * ry + c02[:, None] * r1) * inv_det
    gy = (c01[:, None] * rx + c11[:, None] * ry + c12[:, None] * r1) * inv_det
    b = (c02[:, None] * rx + c12[:, None] * ry + c22[:, None] * r1) * inv_det
    return tuple(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (gx, gy, b))


def lin_grid_sample(image: torch.Tensor, grid: torch.Tensor, n_samples: int = 8,
                    radius: float = 0.5, push_away: bool = True, align_corners: bool = False,
                    padding_mode: str = "zeros", add_intercept: bool = False,
                    generator: torch.Generator | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Drop-in for bilinear ``F.grid_sample`` with linearized multi-sampling gradients.

    Args:
        image: (B, C, H, W) source.
        grid: (B, h, w, 2) sampling points ``(x, y)`` in [-1, 1] (outside reads padding).
        n_samples: K, grids sampled per call including the exact one (8 in the paper).
        radius: jitter std in output pixels' normalised size, ``radius / (w, h)`` (0.5).
        push_away: add jitter of one source pixel std (``2 / (W, H)``), so the fit also spans
            neighbouring source pixels when the grid up-samples.
        align_corners, padding_mode: as in ``F.grid_sample`` (bilinear mode).
        add_intercept: also add the fitted intercept to the value (reference default).
        generator: random generator for the jitter.
        eps: determinant threshold (on the normalised normal matrix) below which a fit is
            treated as singular and its slope set to 0.

    Returns:
        (B, C, h, w). Value: the bilinear sample (plus the intercept if asked). Gradient
        w.r.t. ``image``: bilinear's. Gradient w.r.t. ``grid``: the fitted slopes. Without
        ``add_intercept``, a grid that needs no gradient skips the fit (plain bilinear).
    """
    if n_samples < 4:
        raise ValueError(f"lin_grid_sample: n_samples={n_samples}; the least-squares fit of "
                         "(g_x, g_y, b) needs at least 3 auxiliary samples, use n_samples >= 4")
    if not add_intercept and not (torch.is_grad_enabled() and grid.requires_grad):
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode,
                             align_corners=align_corners)  # same value, no fit to back-propagate
    b, c, hs, ws = image.shape
    _, h, w, _ = grid.shape
    grids, std = _jittered_grids(grid, (hs, ws), n_samples, radius, push_away, generator)
    k = n_samples
    vals = F.grid_sample(image, grids.reshape(b, k * h, w, 2), mode="bilinear",
                         padding_mode=padding_mode, align_corners=align_corners)  # (B,C,K*h,w)
    vals = vals.view(b, c, k, h, w)  # (B, C, K, h, w)
    centre = vals[:, :, 0]  # (B, C, h, w), differentiable w.r.t. image
    d_int = (vals[:, :, 1:] - centre[:, :, None]).detach()  # (B, C, K-1, h, w)
    aux = grids[:, 1:]  # (B, K-1, h, w, 2)
    d_xy = ((aux - grids[:, :1]) / std).permute(0, 4, 1, 2, 3)  # (B, 2, K-1, h, w) in stds
    weight = (aux.abs() <= 1).all(-1).to(image.dtype)  # (B, K-1, h, w) in-image samples
    gx, gy, icpt = _fit_slopes(d_xy, d_int, weight, eps)  # (B, C, h, w) each
    shift = (grid - grid.detach()).permute(0, 3, 1, 2)  # (B, 2, h, w), zero, carries grad
    out = centre + shift[:, None, 0] * (gx / std[0]) + shift[:, None, 1] * (gy / std[1])
    return out + icpt if add_intercept else out  # (B, C, h, w)
