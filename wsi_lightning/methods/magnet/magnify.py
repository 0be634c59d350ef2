"""Magnifying layer of MagNets (Dimitriou et al.): per-patch ST stacks, spatial entmax, sampling.

One magnifying layer takes the N input images I (B, N, 3, 56, 56) of one tree level and their
larger renderings I' (B, N, 3, S, S) and, for each input and each of its P children, predicts an
axis-aligned square crop ``(s, t_x, t_y)`` and samples it from I'::

    I ─ST stack (per node and child)─> map (56, 56) ─1.5-entmax─> PMF π ─> (s, t_x, t_y)
    I' ─linearized multi-sampling at s·grid + t─> child patch (3, out, out)

The ST stack is Appendix A's Inception-like ``Branch(3, 3) → Branch(15, 8) → Branch(40, 1) →
1x1 Conv2D → 1 channel``. Stacks are not shared between siblings or tree nodes; all N·P stacks
of a layer run at once as grouped convolutions (group g = node n·P + child p), which equals
N·P independent stacks, BatchNorm included (its statistics are per channel).

From the PMF π over the 56x56 grid ``g = linspace(-1, 1, 56)`` with marginals π_x, π_y::

    t_x = Σ_x tanh(π_x[x])·g[x]      (tanh_on="marginals", Appendix code; t_y alike)
    t_x = tanh(Σ_x π_x[x]·g[x])      (tanh_on="expectation", paper text)
    s   = Σ_{x,y} π(x,y)·(|g[x] - t_x| + |g[y] - t_y|)
    s   ← clamp(min(s, 1 - max(|t_x|, |t_y|)), min_scale, 1)

The ROI tree is tracked in level-0 pixels as square *frames*: the normalised [-1, 1]² of a node's
image maps onto its frame, so a child's frame is ``centre + t·half ± s·half`` of its parent's.
The part of a frame that lies outside its parent's content (the slide at layer 1) is padding;
``clip_boxes`` gives the content to read and ``canvas_box`` where it goes in the I' canvas.

Deviations from paper:
    - tanh placement is a switch (docs/methods.md register item 16); the default follows the Appendix code.
    - The last 1x1 Conv2D keeps BN + ReLU (the Appendix's last-layer flag, which drops BN, cannot
      be attributed to a layer from the snippet).
    - Padding of a child's I' sits where its frame leaves the parent's content rather than being
      symmetric, so I'_{l+1} stays pixel-aligned with the patch O_p the next stack sees; only the
      layer-1 frame (the whole slide) is padded symmetrically, as in the paper.
    - Frames assume ``align_corners=False`` (normalised ±1 = image borders, not pixel centres).
    - BatchNorm running statistics start as a cumulative average (:class:`WarmBatchNorm2d`), not
      as PyTorch's exponential average from (mean 0, var 1): the crop of a map depends steeply on
      its scale, and after 13 demo steps the plain average's variance was still ~1/4 of
      its initial 1, so evaluation maps came out flat and every evaluated crop was the whole
      image (mean s 0.98 vs 0.49 in training, measured on a trained MagNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from entmax import entmax15
from torch import nn

from wsi_lightning.methods.magnet.lin_sampler import affine_grid, lin_grid_sample


class WarmBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are the cumulative average of the batches seen while
    there are fewer than ``1 / momentum`` of them, then the usual exponential average: an
    exponential average without its start-up bias (the initial mean 0 / variance 1 carry weight
    ``(1 - momentum) ** n`` after n batches otherwise). Same parameters and buffers as
    ``nn.BatchNorm2d``, so checkpoints load either way."""

    _warm = False  # past the start-up (a Python flag: no device sync per step afterwards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and self.momentum and not self._warm:
            base = self.momentum
            n = int(self.num_batches_tracked)  # batches already averaged (this one is n + 1)
            self._warm = 1.0 / (n + 1) <= base
            self.momentum = max(base, 1.0 / (n + 1))
            try:
                return super().forward(x)
            finally:
                self.momentum = base
        return super().forward(x)


class Conv2D(nn.Sequential):
    """Appendix "Conv2D": Conv (no bias, "same" padding) → BatchNorm → ReLU, for ``groups``
    independent stacks: (B, groups·in_ch, H, W) -> (B, groups·out_ch, H, W). ``bn=False`` is the
    Appendix's last-layer variant (ReLU kept)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1,
                 bn: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(groups * in_ch, groups * out_ch, kernel,
                                             padding=kernel // 2, groups=groups, bias=False)]
        if bn:
            layers.append(WarmBatchNorm2d(groups * out_ch, eps=1e-5))
        super().__init__(*layers, nn.ReLU(inplace=True))


class Branch(nn.Module):
    """Appendix "Branch(in, f)": five parallel paths (1x1; 1x1-3x3; 1x1-3x3-3x3; maxpool-1x1;
    1x1-3x3-3x3-3x3) concatenated to 5f channels, optionally reduced by a 1x1 Conv2D.

    (B, groups·in_ch, H, W) -> (B, groups·(out_ch or 5f), H, W), channels group-major.
    """

    def __init__(self, in_ch: int, f: int, out_ch: int | None = None, groups: int = 1) -> None:
        super().__init__()
        f2 = max(int(0.75 * f), 1)

        def conv(i: int, o: int, k: int = 1) -> Conv2D:
            return Conv2D(i, o, k, groups=groups)

        self.groups, self.f = groups, f
        self.paths = nn.ModuleList([
            conv(in_ch, f),
            nn.Sequential(conv(in_ch, f2), conv(f2, f, 3)),
            nn.Sequential(conv(in_ch, f2), conv(f2, f, 3), conv(f, f, 3)),
            nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_ch, f)),
            nn.Sequential(conv(in_ch, f2), conv(f2, f, 3), conv(f, f, 3), conv(f, f, 3)),
        ])
        self.reduce = conv(5 * f, out_ch) if out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = torch.stack([path(x) for path in self.paths], 1)  # (B, 5, G·f, H, W)
        y = y.view(b, 5, self.groups, self.f, h, w).transpose(1, 2)  # (B, G, 5, f, H, W)
        y = y.reshape(b, self.groups * 5 * self.f, h, w)  # (B, G·5f, H, W)
        return y if self.reduce is None else self.reduce(y)


class STStack(nn.Sequential):
    """Appendix A ST stack, ``groups`` independent copies: Branch(in, 3) → Branch(15, 8) →
    Branch(40, 1) → 1x1 Conv2D to one channel. (B, groups·in_ch, H, W) -> (B, groups, H, W)."""

    def __init__(self, groups: int = 1, in_ch: int = 3, widths: tuple[int, int, int] = (3, 8, 1)
                 ) -> None:
        f1, f2, f3 = widths
        super().__init__(Branch(in_ch, f1, groups=groups), Branch(5 * f1, f2, groups=groups),
                         Branch(5 * f2, f3, out_ch=1, groups=groups))


def spatial_entmax(logits: torch.Tensor) -> torch.Tensor:
    """1.5-entmax over all pixels of a map: (..., H, W) -> (..., H, W) sparse PMF."""
    return entmax15(logits.flatten(-2), dim=-1).view_as(logits)  # (..., H·W) -> (..., H, W)


def pmf_to_theta(pmf: torch.Tensor, tanh_on: Literal["marginals", "expectation"] = "marginals",
                 min_scale: float = 0.05) -> torch.Tensor:
    """Crop ``(s, t_x, t_y)`` from a spatial PMF (formulas in the module docstring).

    Args:
        pmf: (..., H, W) probabilities summing to 1 over (H, W).
        tanh_on: "marginals" (Appendix code) or "expectation" (paper text).
        min_scale: lower clamp of s (0.05).

    Returns:
        (..., 3) with ``min_scale <= s <= 1 - max(|t_x|, |t_y|)`` whenever that bound allows.
    """
    h, w = pmf.shape[-2:]
    gx = torch.linspace(-1, 1, w, dtype=pmf.dtype, device=pmf.device)  # (W,)
    gy = torch.linspace(-1, 1, h, dtype=pmf.dtype, device=pmf.device)  # (H,)
    px, py = pmf.sum(-2), pmf.sum(-1)  # (..., W), (..., H) marginals
    if tanh_on == "marginals":
        tx, ty = (torch.tanh(px) * gx).sum(-1), (torch.tanh(py) * gy).sum(-1)  # (...,)
    elif tanh_on == "expectation":
        tx, ty = torch.tanh((px * gx).sum(-1)), torch.tanh((py * gy).sum(-1))  # (...,)
    else:
        raise ValueError(f"tanh_on={tanh_on!r}; expected 'marginals' or 'expectation'")
    dist = (gx - tx[..., None, None]).abs() + (gy[:, None] - ty[..., None, None]).abs()  # (...,H,W)
    s = (pmf * dist).sum((-2, -1))  # (...,)
    s = torch.minimum(s, 1 - torch.maximum(tx.abs(), ty.abs())).clamp(min_scale, 1.0)
    return torch.stack([s, tx, ty], -1)  # (..., 3)


def sample_patches(source: torch.Tensor, theta: torch.Tensor, out_size: int,
                   sampler: Literal["linearized", "bilinear"] = "linearized",
                   align_corners: bool = False, **lin_kwargs) -> torch.Tensor:
    """Sample square crops from source images (zeros padding, so outside stays black).

    Args:
        source: (B, C, S, S') images I'.
        theta: (B, 3) crops ``(s, t_x, t_y)`` in the source's normalised coordinates.
        out_size: side of the output patches.
        sampler: "linearized" (paper) or "bilinear" (ablation).
        align_corners: as in ``F.grid_sample``.
        **lin_kwargs: passed to :func:`lin_grid_sample` (n_samples, radius, ...).

    Returns:
        (B, C, out_size, out_size).
    """
    grid = affine_grid(theta, (out_size, out_size), align_corners)  # (B, o, o, 2)
    if sampler == "linearized":
        return lin_grid_sample(source, grid, align_corners=align_corners, **lin_kwargs)
    if sampler == "bilinear":
        return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=align_corners)
    raise ValueError(f"sampler={sampler!r}; expected 'linearized' or 'bilinear'")


@dataclass
class MagnifyOutput:
    """MagnifyingLayer outputs; children of node n are ``[:, n, p]`` (tree order = flatten(1, 2)).

    Attributes:
        patches: (B, N, P, C, out, out) child patches O_p.
        theta: (B, N, P, 3) child crops ``(s, t_x, t_y)`` relative to the node's image.
        pmf: (B, N, P', H, W) spatial PMFs of the P' learned children (P' = P - 1 when the first
            child is frozen).
    """

    patches: torch.Tensor
    theta: torch.Tensor
    pmf: torch.Tensor


class MagnifyingLayer(nn.Module):
    """One tree level: N nodes, P children each, N·P (or N·(P-1)) independent ST stacks.

    Args:
        n_nodes: N, inputs per slide at this level (``Π_{j<l} P_j``).
        n_patches: P, children per input.
        out_size: side of the sampled children (56, or 224 at the last layer).
        freeze_first: child 0 of every node is the identity crop (s = 1, t = 0) and has no stack
            (the paper's frozen patch, used at layer 2).
        tanh_on, min_scale: see :func:`pmf_to_theta`.
        sampler, align_corners, lin_kwargs: see :func:`sample_patches`.
        in_ch: image channels.
    """

    def __init__(self, n_nodes: int, n_patches: int, out_size: int = 56,
                 freeze_first: bool = False,
                 tanh_on: Literal["marginals", "expectation"] = "marginals",
                 min_scale: float = 0.05,
                 sampler: Literal["linearized", "bilinear"] = "linearized",
                 align_corners: bool = False, lin_kwargs: dict | None = None,
                 in_ch: int = 3) -> None:
        super().__init__()
        if n_patches < 1 or n_nodes < 1 or (freeze_first and n_patches < 2):
            raise ValueError(f"MagnifyingLayer: n_nodes={n_nodes}, n_patches={n_patches}, "
                             f"freeze_first={freeze_first}; need n_nodes >= 1 and n_patches >= 1 "
                             "(>= 2 with freeze_first, which leaves child 0 without a stack)")
        if tanh_on not in ("marginals", "expectation"):
            raise ValueError(f"MagnifyingLayer: tanh_on={tanh_on!r}; expected 'marginals' "
                             "(Appendix code) or 'expectation' (paper text)")
        if sampler not in ("linearized", "bilinear"):
            raise ValueError(f"MagnifyingLayer: sampler={sampler!r}; expected 'linearized' or "
                             "'bilinear'")
        self.n_nodes, self.n_patches, self.out_size = n_nodes, n_patches, out_size
        self.freeze_first, self.tanh_on, self.min_scale = freeze_first, tanh_on, min_scale
        self.sampler, self.align_corners = sampler, align_corners
        self.lin_kwargs = dict(lin_kwargs or {})
        self.n_learned = n_patches - int(freeze_first)
        self.stacks = STStack(groups=n_nodes * self.n_learned, in_ch=in_ch)

    def forward(self, images: torch.Tensor, sources: torch.Tensor) -> MagnifyOutput:
        """Predict and sample the children of every node.

        Args:
            images: (B, N, C, H, W) node images I (H = W = 56 in the paper).
            sources: (B, N, C, S, S) larger renderings I' of the same regions.

        Returns:
            MagnifyOutput with patches (B, N, P, C, out, out) and theta (B, N, P, 3).
        """
        b, n, c, h, w = images.shape
        if n != self.n_nodes or sources.shape[:3] != (b, n, c):
            k = self.n_nodes
            raise ValueError(f"MagnifyingLayer(n_nodes={k}): got images {tuple(images.shape)} "
                             f"and sources {tuple(sources.shape)}; expected (B, {k}, C, H, W) and "
                             f"(B, {k}, C, S, S)")
        pl, p = self.n_learned, self.n_patches
        x = images[:, :, None].expand(b, n, pl, c, h, w).reshape(b, n * pl * c, h, w)  # groups
        logits = self.stacks(x).view(b, n, pl, h, w)  # (B, N, P', H, W)
        pmf = spatial_entmax(logits)  # (B, N, P', H, W)
        theta = pmf_to_theta(pmf, self.tanh_on, self.min_scale)  # (B, N, P', 3)
        if self.freeze_first:
            ident = theta.new_tensor([1.0, 0.0, 0.0]).expand(b, n, 1, 3)  # (B, N, 1, 3)
            theta = torch.cat([ident, theta], 2)  # (B, N, P, 3)
        src = sources[:, :, None].expand(b, n, p, *sources.shape[2:]).flatten(0, 2)  # (BNP,C,S,S)
        patches = sample_patches(src, theta.reshape(b * n * p, 3), self.out_size, self.sampler,
                                 self.align_corners, **self.lin_kwargs)  # (B·N·P, C, o, o)
        patches = patches.view(b, n, p, c, self.out_size, self.out_size)
        return MagnifyOutput(patches=patches, theta=theta, pmf=pmf)


def square_frame(roi: torch.Tensor) -> torch.Tensor:
    """Square frame centred on a box, side = the box's longer side (symmetric padding).

    Args:
        roi: (..., 4) boxes ``(x0, y0, x1, y1)`` in level-0 pixels.

    Returns:
        (..., 4) square frames.
    """
    centre = (roi[..., :2] + roi[..., 2:]) / 2  # (..., 2)
    half = (roi[..., 2:] - roi[..., :2]).amax(-1, keepdim=True) / 2  # (..., 1)
    return torch.cat([centre - half, centre + half], -1)


def child_frames(frames: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Level-0 frames of children from their crops relative to the parent's frame.

    Args:
        frames: (..., 4) parent frames ``(x0, y0, x1, y1)``.
        theta: (..., P, 3) child crops ``(s, t_x, t_y)``.

    Returns:
        (..., P, 4) child frames ``centre + t·half ± s·half``.
    """
    centre = (frames[..., None, :2] + frames[..., None, 2:]) / 2  # (..., 1, 2)
    half = (frames[..., None, 2:] - frames[..., None, :2]) / 2  # (..., 1, 2)
    c = centre + theta[..., 1:] * half  # (..., P, 2)
    hh = theta[..., :1] * half  # (..., P, 2)
    return torch.cat([c - hh, c + hh], -1)


def relative_theta(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`child_frames`: crops of square boxes relative to parent frames.

    Args:
        frames: (..., 4) parent frames.
        boxes: (..., P, 4) child frames.

    Returns:
        (..., P, 3) ``(s, t_x, t_y)`` (s from the x extent).
    """
    centre = (frames[..., None, :2] + frames[..., None, 2:]) / 2  # (..., 1, 2)
    half = (frames[..., None, 2:] - frames[..., None, :2]) / 2  # (..., 1, 2)
    t = ((boxes[..., :2] + boxes[..., 2:]) / 2 - centre) / half  # (..., P, 2)
    s = (boxes[..., 2:3] - boxes[..., 0:1]) / (2 * half[..., :1])  # (..., P, 1)
    return torch.cat([s, t], -1)


def clip_boxes(boxes: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Intersection of boxes with bounds (empty intersections have zero width or height).

    Args:
        boxes: (..., 4) ``(x0, y0, x1, y1)``.
        bounds: (..., 4), broadcastable to boxes.

    Returns:
        (..., 4) with ``x0 <= x1`` and ``y0 <= y1``.
    """
    lo = torch.maximum(boxes[..., :2], bounds[..., :2])  # (..., 2)
    hi = torch.maximum(torch.minimum(boxes[..., 2:], bounds[..., 2:]), lo)  # (..., 2)
    return torch.cat([lo, hi], -1)


def canvas_box(frame: torch.Tensor, content: torch.Tensor, size: int) -> torch.Tensor:
    """Where content read from the slide goes in a frame's size x size canvas (I').

    Args:
        frame: (..., 4) square frames in level-0 pixels.
        content: (..., 4) the part of each frame to read (``clip_boxes(frame, parent_content)``).
        size: canvas side in pixels (112 for I').

    Returns:
        (..., 4) float pixel box ``(x0, y0, x1, y1)`` in the canvas; the rest is black padding.
    """
    origin = torch.cat([frame[..., :2], frame[..., :2]], -1)  # (..., 4) x0 y0 x0 y0
    side = frame[..., 2:3] - frame[..., 0:1]  # (..., 1)
    return (content - origin) / side * size


def tree_counts(patches_per_layer: tuple[int, ...]) -> tuple[list[int], int]:
    """Inputs per layer ``N_in(l) = Π_{j<l} P_j`` and the number of leaves ``Π_j P_j``.

    Args:
        patches_per_layer: (P_1, ..., P_L).

    Returns:
        ``([N_in(1), ..., N_in(L)], N_out(L))``; (3, 2, 3) gives ([1, 3, 6], 18).
    """
    n_in = [math.prod(patches_per_layer[:i]) for i in range(len(patches_per_layer))]
    return n_in, math.prod(patches_per_layer)


def pixel_count(patches_per_layer: tuple[int, ...], in_size: int = 56, leaf_size: int = 224,
                channels: int = 3, source_size: int = 0) -> int:
    """Values processed per slide: ``channels·(Σ_l N_in(l)·in² + N_out(L)·leaf²)``, plus
    ``Σ_l N_in(l)·source²`` per channel for the I' reads when ``source_size`` > 0 (the paper
    leaves them out). (3, 2, 3) gives 2,803,584; (3, 2, 3, 2) gives 5,682,432."""
    n_in, n_leaves = tree_counts(patches_per_layer)
    per_channel = sum(n_in) * (in_size**2 + source_size**2) + n_leaves * leaf_size**2
    return channels * per_channel
