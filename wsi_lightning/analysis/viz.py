"""Rendering helpers for per-tile scores on slide thumbnails (attention, attributions...).

Everything here is generic: a score per tile, the tiles' level-0 top-left coordinates and
their side in level-0 pixels. Figures are drawn on a matplotlib ``Figure`` (no ``pyplot``
global state, safe off the main thread) and written atomically (temp file, then rename).

Normalisations (:func:`normalise`), computed over one slide's valid (finite) values:

    raw         the values as given (e.g. attention weights summing to 1 over the slide).
    softmax     ``exp(v - max v) / sum exp(v - max v)``: sums to 1; for unnormalised scores.
    minmax      ``(v - min) / (max - min)``: 0 for the lowest tile, 1 for the highest.
    percentile  ``(rank - 1) / (n - 1)`` with tied values sharing their average rank: the
                position of each tile among the slide's tiles in [0, 1], robust to outliers
                (CLAM's heat-map convention; CLAM's ``percentileofscore`` gives rank / n).

A slide whose values are all equal has no contrast: minmax and percentile give 0.5 everywhere.
For display, :func:`display_range` gives the colour scale: [0, 1] for minmax and percentile,
[0, slide max] for raw and softmax (so a tile with half the top tile's weight is drawn half way
up the scale, and the colour bar shows the actual values).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NORMALISATIONS = ("raw", "softmax", "minmax", "percentile")


# ----------------------------------------------------------------------------- values
def normalise(values: np.ndarray, mode: str) -> np.ndarray:
    """Normalise one slide's per-tile values (see the module docstring for each mode).

    Args:
        values: (N,) scores; NaN marks tiles to leave out (they stay NaN).
        mode: one of ``raw | softmax | minmax | percentile``.

    Returns:
        (N,) float64 normalised values.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalisation {mode!r} is unknown; expected one of {list(NORMALISATIONS)}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.full_like(v, np.nan)
    ok = np.isfinite(v)
    x = v[ok]
    if x.size == 0:
        return out
    if mode == "raw":
        out[ok] = x
    elif mode == "softmax":
        e = np.exp(x - x.max())
        out[ok] = e / e.sum()
    elif mode == "minmax":
        lo, hi = x.min(), x.max()
        out[ok] = (x - lo) / (hi - lo) if hi > lo else 0.5
    else:
        out[ok] = _average_rank(x) / (x.size - 1) if x.size > 1 else 0.5
    return out


def _average_rank(x: np.ndarray) -> np.ndarray:
    """(N,) 0-based ranks of ``x``; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sx = x[order]
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], sx.size]  # one past the last
    group_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def display_range(values: np.ndarray, mode: str) -> tuple[float, float]:
    """Colour scale ``(vmin, vmax)`` for values returned by :func:`normalise` in ``mode``.

    minmax / percentile: (0, 1). raw / softmax: (0, slide max), or (0, 1) when the max is not
    positive; negative raw values are drawn as 0.
    """
    if mode in ("minmax", "percentile"):
        return 0.0, 1.0
    v = np.asarray(values, dtype=np.float64)
    top = float(np.nanmax(v)) if np.isfinite(v).any() else 0.0
    return (0.0, top) if top > 0 else (0.0, 1.0)


def to_unit(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(N,) ``(v - vmin) / (vmax - vmin)`` clipped to [0, 1]; NaN stays NaN."""
    v = np.asarray(values, dtype=np.float64)
    span = vmax - vmin if vmax > vmin else 1.0
    return np.clip((v - vmin) / span, 0.0, 1.0)


# ----------------------------------------------------------------------------- heat-map
def tile_means(
    values: np.ndarray,
    coords: np.ndarray,
    extent_level0: float,
    shape: tuple[int, int],
    scale: float,
) -> np.ndarray:
    """Each pixel's mean value over the tiles covering it, on an image ``scale`` times level 0.

    A tile covers pixels ``round(x * s) .. round((x + extent) * s)`` (at least one pixel), so a
    dense grid of tiles paints the tissue without gaps or overlaps; where tiles do overlap their
    values are averaged.

    Args:
        values: (N,) per-tile values; NaN tiles are not painted.
        coords: (N, 2) level-0 (x, y) top-left corner of each tile.
        extent_level0: tile side in level-0 pixels.
        shape: (h, w) of the image.
        scale: image pixels per level-0 pixel.

    Returns:
        (h, w) float64 means, NaN where no tile lies.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(values) != len(coords):
        raise ValueError(f"tile values and coords differ: {len(values)} values but {len(coords)} coords")
    h, w = int(shape[0]), int(shape[1])
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    x0 = np.round(coords[:, 0] * scale).astype(np.int64)
    y0 = np.round(coords[:, 1] * scale).astype(np.int64)
    x1 = np.maximum(np.round((coords[:, 0] + extent_level0) * scale).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((coords[:, 1] + extent_level0) * scale).astype(np.int64), y0 + 1)
    for i in np.flatnonzero(np.isfinite(values)):
        xa, xb = max(x0[i], 0), min(x1[i], w)
        ya, yb = max(y0[i], 0), min(y1[i], h)
        if xa < xb and ya < yb:
            total[ya:yb, xa:xb] += values[i]
            count[ya:yb, xa:xb] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def tile_heatmap(
    values: np.ndarray,
    coords: np.ndarray,
    extent_level0: float,
    thumb: np.ndarray,
    thumb_scale: float,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> np.ndarray:
    """Paint each tile's square with its value's colour, blended over the thumbnail.

    Tiles are placed as :func:`tile_means` places them (overlaps averaged).

    Args:
        values: (N,) per-tile values in [0, 1]; NaN tiles are not painted.
        coords: (N, 2) level-0 (x, y) top-left corner of each tile.
        extent_level0: tile side in level-0 pixels.
        thumb: (h, w, 3) uint8 thumbnail of the whole slide.
        thumb_scale: thumbnail pixels per level-0 pixel.
        cmap: matplotlib colormap name.
        alpha: opacity of the colour over the thumbnail.

    Returns:
        (h, w, 3) uint8 thumbnail with painted tiles (unpainted pixels unchanged).
    """
    import matplotlib

    mean = tile_means(values, coords, extent_level0, thumb.shape[:2], thumb_scale)
    painted = np.isfinite(mean)
    out = thumb[..., :3].copy()
    if painted.any():
        colour = matplotlib.colormaps[cmap](np.clip(mean[painted], 0.0, 1.0))[:, :3] * 255.0  # (P, 3)
        base = out[painted].astype(np.float64)
        out[painted] = np.clip(np.round((1 - alpha) * base + alpha * colour), 0, 255).astype(np.uint8)
    return out


def tile_rgba(
    values: np.ndarray,
    coords: np.ndarray,
    extent_level0: float,
    shape: tuple[int, int],
    scale: float,
    cmap: str = "jet",
) -> np.ndarray:
    """The tiles' colours as a layer of its own: opaque where a tile lies, transparent elsewhere
    (for a viewer that sets the opacity itself). Tiles are placed as :func:`tile_means` does.

    Args:
        values: (N,) per-tile values in [0, 1]; NaN tiles are not painted.
        coords: (N, 2) level-0 (x, y) top-left corner of each tile.
        extent_level0: tile side in level-0 pixels.
        shape: (h, w) of the layer.
        scale: layer pixels per level-0 pixel.
        cmap: matplotlib colormap name.

    Returns:
        (h, w, 4) uint8 RGBA.
    """
    import matplotlib

    mean = tile_means(values, coords, extent_level0, shape, scale)
    painted = np.isfinite(mean)
    out = np.zeros((*mean.shape, 4), np.uint8)
    if painted.any():
        rgb = matplotlib.colormaps[cmap](np.clip(mean[painted], 0.0, 1.0))[:, :3] * 255.0  # (P, 3)
        out[painted, :3] = np.round(rgb).astype(np.uint8)
        out[painted, 3] = 255
    return out


# ----------------------------------------------------------------------------- annotations
def draw_polygons(
    ax_or_image: Any,
    polygons_level0: Sequence[np.ndarray],
    thumb_scale: float,
    color: str | tuple[int, int, int] = "black",
    linewidth: float = 1.0,
) -> Any:
    """Outline polygons (e.g. annotated lesions) on a thumbnail.

    Args:
        ax_or_image: a matplotlib ``Axes`` showing the thumbnail (outlines are added to it),
            or an (h, w, 3) uint8 image (a copy with outlines is returned).
        polygons_level0: (K, 2) level-0 (x, y) vertex arrays.
        thumb_scale: thumbnail pixels per level-0 pixel.
        color: outline colour (a matplotlib colour for Axes; a name or RGB tuple for images).
        linewidth: line width (points on Axes, pixels on images).

    Returns:
        The Axes, or the outlined image copy.
    """
    rings = [np.asarray(p, dtype=np.float64) * thumb_scale for p in polygons_level0]
    if isinstance(ax_or_image, np.ndarray):
        from PIL import Image, ImageDraw

        img = Image.fromarray(np.ascontiguousarray(ax_or_image[..., :3]))
        draw = ImageDraw.Draw(img)
        for r in rings:
            pts = [(float(x), float(y)) for x, y in r]
            draw.line(pts + pts[:1], fill=color, width=max(1, round(linewidth)))
        return np.asarray(img)
    for r in rings:
        closed = np.vstack([r, r[:1]])
        # pixel centres sit at integer positions in imshow: shift by half a pixel
        ax_or_image.plot(closed[:, 0] - 0.5, closed[:, 1] - 0.5, color=color, linewidth=linewidth)
    return ax_or_image


# ----------------------------------------------------------------------------- figures
def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_heatmap_figure(
    path: str | os.PathLike,
    thumb: np.ndarray,
    overlay: np.ndarray,
    title: str,
    colorbar_label: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "jet",
    polygons_level0: Sequence[np.ndarray] | None = None,
    thumb_scale: float | None = None,
) -> Path:
    """Thumbnail | heat-map overlay side by side with a colour bar, saved as PNG.

    Args:
        path: output PNG.
        thumb: (h, w, 3) uint8 thumbnail.
        overlay: (h, w, 3) uint8 painted thumbnail (:func:`tile_heatmap`).
        title: figure title.
        colorbar_label: colour bar label.
        vmin: value at the bottom of the colour bar.
        vmax: value at the top of the colour bar.
        cmap: the colormap ``overlay`` was painted with.
        polygons_level0: optional (K, 2) level-0 polygons outlined on both panels.
        thumb_scale: thumbnail pixels per level-0 pixel (needed with ``polygons_level0``).

    Returns:
        ``path``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = thumb.shape[:2]
    panel_w = float(np.clip(max(w, h) / 100.0, 4.0, 8.0)) * w / max(w, h)  # inches at 100 dpi
    panel_h = panel_w * h / max(w, 1)
    fig = Figure(figsize=(2 * panel_w + 1.4, panel_h + 0.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, img, name in zip(axes, (thumb, overlay), ("slide", "heat-map"), strict=True):
        ax.imshow(img, interpolation="antialiased")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        if polygons_level0:
            if thumb_scale is None:
                raise ValueError("save_heatmap_figure: polygons_level0 needs thumb_scale")
            draw_polygons(ax, polygons_level0, thumb_scale, color="black", linewidth=0.8)
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
    hi = vmax if vmax > vmin else vmin + 1.0
    sm = ScalarMappable(norm=Normalize(vmin=vmin, vmax=hi), cmap=cmap)
    fig.colorbar(sm, ax=axes[1], fraction=0.046, pad=0.02, label=colorbar_label)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def tile_montage(
    tiles: Sequence[np.ndarray],
    labels: Sequence[str],
    ncols: int,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """A grid of tile images with a caption under each, saved as PNG.

    Args:
        tiles: (h, w, 3) uint8 images.
        labels: one caption per tile.
        ncols: tiles per row (fewer when there are fewer tiles).
        path: output PNG.
        title: optional figure title.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    if len(tiles) != len(labels):
        raise ValueError(f"tile_montage: {len(tiles)} tiles but {len(labels)} labels")
    if ncols < 1:
        raise ValueError(f"tile_montage: ncols must be >= 1, got {ncols}")
    n = max(len(tiles), 1)
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + (0.3 if title else 0.0)), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(tiles):
            ax.imshow(tiles[i])
            ax.set_title(labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
