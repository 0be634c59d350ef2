"""Painters for synthetic H&E slides: small functions that each add one layer to a ``Canvas``.

A canvas holds stain concentration maps (hematoxylin ``h``, eosin ``e``) and region masks at the
slide's pixel size; ``compose`` turns them into RGB with Beer-Lambert mixing of the palette's
optical densities. Every painter draws in microns (``canvas.mpp`` converts), so one ``SlideSpec``
gives the same tissue at 0.25 or 0.5 µm/px, and each draws its random numbers from its own stream
``default_rng([spec.seed, stream])``, so adding a painter never changes what the others draw.

Painter signature: ``painter(canvas: Canvas, spec: SlideSpec) -> None`` (see ``synthetic.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

if TYPE_CHECKING:
    from wsi_lightning.slides.synthetic import NucleiSpec, Palette, SlideSpec, TissueSpec

CELL_UM = 8.0  # grid of the low-resolution tissue field
STREAM_TISSUE, STREAM_STROMA, STREAM_NUCLEI, STREAM_TUMOUR = 1, 2, 3, 4
H_MAX = 2.6  # cap on hematoxylin concentration where nuclei overlap


@dataclass
class Canvas:
    """Stain and region maps of one slide, all (height, width) at `mpp`."""

    mpp: float
    tissue: np.ndarray  # bool
    lesion: np.ndarray  # bool
    h: np.ndarray  # float32 hematoxylin concentration
    e: np.ndarray  # float32 eosin concentration

    @classmethod
    def empty(cls, height: int, width: int, mpp: float) -> Canvas:
        zeros = np.zeros((height, width), np.float32)
        return cls(mpp, zeros.astype(bool), zeros.astype(bool), zeros, zeros.copy())

    @property
    def shape(self) -> tuple[int, int]:
        return self.h.shape


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit sd. Returns `shape` float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def upsample(field: np.ndarray, cell_um: float, canvas: Canvas) -> np.ndarray:
    """Bilinear upsampling of a field with `cell_um` cells to the canvas pixel grid.

    Args:
        field: (ny, nx) float32 covering at least the canvas.

    Returns:
        (height, width) float32, physically aligned (cell i spans [i, i+1) * cell_um).
    """
    height, width = canvas.shape
    box = (0, 0, width * canvas.mpp / cell_um, height * canvas.mpp / cell_um)
    img = Image.fromarray(np.ascontiguousarray(field, np.float32), "F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR, box=box))


def tissue_field(tissue: TissueSpec, width_um: float, height_um: float, seed: int):
    """Low-resolution tissue field and the threshold that gives `tissue.coverage`.

    Returns:
        ((ny, nx) float32 field on CELL_UM cells, threshold); tissue is ``field > threshold``.
    """
    rng = np.random.default_rng([seed, STREAM_TISSUE])
    ny, nx = math.ceil(height_um / CELL_UM) + 1, math.ceil(width_um / CELL_UM) + 1
    ys, xs = (np.mgrid[0:ny, 0:nx].astype(np.float32) + 0.5) * CELL_UM
    field = np.zeros((ny, nx), np.float32)
    for cx, cy, rx, ry, angle in tissue.blobs:
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        field = np.maximum(field, np.exp(-0.5 * ((u / rx) ** 2 + (v / ry) ** 2)))
    field += tissue.roughness * (
        0.85 * smooth_noise(rng, (ny, nx), 40 / CELL_UM) + 0.15 * smooth_noise(rng, (ny, nx), 1.5)
    )
    margin = np.minimum(np.minimum(xs, width_um - xs), np.minimum(ys, height_um - ys))
    field *= np.clip(margin / 80.0, 0, 1)  # keep a strip of glass along the edges
    inside = (xs < width_um) & (ys < height_um)
    threshold = float(np.quantile(field[inside], 1 - tissue.coverage))
    return field, threshold


def lowres_tissue(spec: SlideSpec) -> np.ndarray:
    """(ny, nx) bool tissue on CELL_UM cells (used to place lesions inside tissue)."""
    field, threshold = tissue_field(spec.tissue, spec.width_um, spec.height_um, spec.seed)
    return field > threshold


def polygon_mask(canvas: Canvas, polygons_um: list[np.ndarray]) -> np.ndarray:
    """Rasterise polygons given in microns. Returns (height, width) bool."""
    height, width = canvas.shape
    img = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons_um:
        draw.polygon([tuple(p) for p in (poly / canvas.mpp).tolist()], fill=1)
    return np.asarray(img)


def paint_tissue(canvas: Canvas, spec: SlideSpec) -> None:
    """Tissue blobs with irregular edges, minus a few round lumens (white space)."""
    field, threshold = tissue_field(spec.tissue, spec.width_um, spec.height_um, spec.seed)
    canvas.tissue = upsample(field, CELL_UM, canvas) > threshold
    rng = np.random.default_rng([spec.seed, STREAM_TISSUE, 1])
    cells = np.argwhere(field > threshold)
    area_mm2 = len(cells) * CELL_UM**2 / 1e6
    n = rng.poisson(spec.tissue.lumen_per_mm2 * area_mm2) if len(cells) else 0
    lumens = []
    for cy, cx in cells[rng.integers(0, len(cells), n)] if n else []:
        r = spec.tissue.lumen_radius_um * rng.uniform(0.5, 1.5)
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        rr = r * (1 + 0.25 * np.sin(2 * t + rng.uniform(0, 6)) * rng.uniform(0, 1))
        centre = (np.array([cx, cy]) + rng.uniform(0, 1, 2)) * CELL_UM
        lumens.append(centre + np.stack([rr * np.cos(t), 0.7 * rr * np.sin(t)], 1))
    if lumens:
        canvas.tissue &= ~polygon_mask(canvas, lumens)


def paint_lesion_regions(canvas: Canvas, spec: SlideSpec) -> None:
    """Lesion outlines become (solid) tissue; their content is painted by the later painters."""
    if spec.lesions:
        canvas.lesion = polygon_mask(canvas, [les.outline_um() for les in spec.lesions])
        canvas.tissue |= canvas.lesion


def paint_stroma(canvas: Canvas, spec: SlideSpec) -> None:
    """Eosin stroma with wavy fibres and grain; paler, bluer cytoplasm inside lesions."""
    st = spec.stroma
    rng = np.random.default_rng([spec.seed, STREAM_STROMA])
    height, width = canvas.shape
    ny, nx = math.ceil(height * canvas.mpp / 16) + 2, math.ceil(width * canvas.mpp / 16) + 2
    warp = upsample(smooth_noise(rng, (ny, nx), 3.0), 16.0, canvas)
    tone = upsample(smooth_noise(rng, (ny, nx), 2.0), 16.0, canvas)
    k = np.float32(2 * np.pi * canvas.mpp / st.fibre_um)
    xs = np.arange(width, dtype=np.float32) * k * np.float32(math.cos(st.fibre_angle))
    ys = np.arange(height, dtype=np.float32) * k * np.float32(math.sin(st.fibre_angle))
    phase = warp * np.float32(st.waviness)
    phase += xs[None, :]
    phase += ys[:, None]
    fib = np.sin(phase)  # (H, W) in [-1, 1]
    fib *= np.float32(st.fibre_contrast / 2) * (1 + np.float32(0.5) * tone)  # fibre bundles
    fib += np.float32(1 - st.fibre_contrast / 2)
    fib *= 1 + np.float32(0.1) * warp
    fib *= rng.uniform(0.8, 1.2, size=fib.shape).astype(np.float32)  # grain
    fib *= np.float32(st.eosin)
    fib[~canvas.tissue] = 0
    canvas.e = fib
    canvas.h = np.where(canvas.tissue, np.float32(st.haze), np.float32(0))
    if canvas.lesion.any():
        canvas.e[canvas.lesion] *= np.float32(0.5)
        canvas.h[canvas.lesion] += np.float32(0.25)


def paint_nuclei(canvas: Canvas, spec: SlideSpec) -> None:
    """Scattered stromal/normal nuclei in tissue outside lesions."""
    rng = np.random.default_rng([spec.seed, STREAM_NUCLEI])
    region = canvas.tissue & ~canvas.lesion
    stamp_nuclei(canvas, region, spec.nuclei, rng, cluster=0.5)


def paint_tumour_nuclei(canvas: Canvas, spec: SlideSpec) -> None:
    """Dense, large, dark, irregular tumour nuclei inside lesions."""
    if spec.lesions:
        rng = np.random.default_rng([spec.seed, STREAM_TUMOUR])
        stamp_nuclei(canvas, canvas.lesion, spec.tumour_nuclei, rng, cluster=0.1)


def stamp_nuclei(
    canvas: Canvas, region: np.ndarray, ns: NucleiSpec, rng: np.random.Generator, cluster: float
) -> None:
    """Add nuclei (hematoxylin) at jittered-grid positions inside `region`, vectorised.

    Each nucleus is a rotated ellipse with a wobbly outline (harmonics 2 and 3), a soft 1-px edge
    and chromatin speckle, evaluated on a (n, k, k) window per nucleus and scatter-added.
    """
    height, width = canvas.shape
    spacing = 1000.0 / math.sqrt(ns.density_per_mm2) / canvas.mpp  # px between grid points
    gy, gx = np.mgrid[0 : height / spacing, 0 : width / spacing].reshape(2, -1) * spacing
    xs = gx + rng.uniform(0, spacing, gx.shape)
    ys = gy + rng.uniform(0, spacing, gy.shape)
    ix, iy = xs.astype(np.int64), ys.astype(np.int64)
    ok = (ix < width) & (iy < height)
    ok[ok] = region[iy[ok], ix[ok]]
    ny, nx = math.ceil(height * canvas.mpp / 16) + 2, math.ceil(width * canvas.mpp / 16) + 2
    density = upsample(smooth_noise(rng, (ny, nx), 3.0), 16.0, canvas)
    ok[ok] &= rng.uniform(0, 1, int(ok.sum())) < 0.8 + cluster * 0.3 * density[iy[ok], ix[ok]]
    xs, ys = xs[ok], ys[ok]
    n = len(xs)
    if n == 0:
        return
    r = ns.radius_um / canvas.mpp * np.clip(1 + ns.radius_jitter * rng.standard_normal(n), 0.5, 1.6)
    elong = 1 + (ns.elongation - 1) * rng.uniform(0.3, 1.7, n)
    params = {
        "rx": r * np.sqrt(elong),
        "ry": r / np.sqrt(elong),
        "theta": rng.uniform(0, np.pi, n),
        "wobble": ns.irregularity * rng.uniform(0.3, 1.0, (n, 2)),
        "phase": rng.uniform(0, 2 * np.pi, (n, 2)),
        "stain": ns.stain * rng.uniform(0.75, 1.2, n),
    }
    k = 2 * math.ceil(float(params["rx"].max()) * (1 + ns.irregularity) + 1) + 1
    flat_h = canvas.h.reshape(-1)
    for start in range(0, n, 1024):
        sl = slice(start, start + 1024)
        vals, idx = _nucleus_windows(
            xs[sl],
            ys[sl],
            {a: b[sl] for a, b in params.items()},
            k,
            ns.chromatin,
            rng,
            canvas.shape,
        )
        np.add.at(flat_h, idx, vals)
    np.minimum(canvas.h, np.float32(H_MAX), out=canvas.h)


def _nucleus_windows(xs, ys, p, k, chromatin, rng, shape):
    """Per-nucleus (n, k, k) stamps and their flat canvas indices (in-bounds only)."""
    height, width = shape
    d = np.arange(k, dtype=np.float32) - k // 2
    ix, iy = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    dx = d[None, None, :] - (xs - ix).astype(np.float32)[:, None, None]  # (n, 1, k)
    dy = d[None, :, None] - (ys - iy).astype(np.float32)[:, None, None]  # (n, k, 1)
    cos = np.cos(p["theta"]).astype(np.float32)[:, None, None]
    sin = np.sin(p["theta"]).astype(np.float32)[:, None, None]
    u = (dx * cos + dy * sin) / p["rx"].astype(np.float32)[:, None, None]  # (n, k, k)
    v = (dy * cos - dx * sin) / p["ry"].astype(np.float32)[:, None, None]
    ang = np.arctan2(v, u)
    wob = 1 + p["wobble"][:, 0, None, None] * np.cos(2 * ang + p["phase"][:, 0, None, None])
    wob += p["wobble"][:, 1, None, None] * np.cos(3 * ang + p["phase"][:, 1, None, None])
    rho = np.sqrt(u * u + v * v) / wob
    r_px = np.sqrt(p["rx"] * p["ry"]).astype(np.float32)[:, None, None]
    val = np.clip((1 - rho) * r_px + 0.5, 0, 1)  # soft 1-px edge
    val *= (1 - chromatin) + chromatin * rng.uniform(0, 1, val.shape).astype(np.float32)
    val *= (0.85 + 0.3 * np.minimum(rho, 1)) * p["stain"].astype(np.float32)[:, None, None]
    yy = iy[:, None, None] + d.astype(np.int64)[None, :, None]  # (n, k, 1)
    xx = ix[:, None, None] + d.astype(np.int64)[None, None, :]  # (n, 1, k)
    inside = (val > 0) & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    idx = np.broadcast_to(yy * width + xx, val.shape)[inside]
    return val[inside], idx


def compose(canvas: Canvas, palette: Palette) -> np.ndarray:
    """Beer-Lambert mixing: rgb = 255 * exp(-(h * H_od + e * E_od + background_od)).

    Returns:
        (height, width, 3) uint8 RGB.
    """
    out = np.empty((*canvas.shape, 3), np.uint8)
    h_od = np.asarray(palette.hematoxylin, np.float32) * np.float32(palette.h_strength)
    e_od = np.asarray(palette.eosin, np.float32) * np.float32(palette.e_strength)
    for c in range(3):
        od = canvas.h * -h_od[c]
        od -= canvas.e * e_od[c]
        od -= np.float32(palette.background[c])
        np.exp(od, out=od)
        od *= 255
        out[..., c] = od
    return out
