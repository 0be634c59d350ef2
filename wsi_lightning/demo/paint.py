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
    from wsi_lightning.demo.specs import (
        AtypiaSpec,
        NucleiSpec,
        Palette,
        SlideSpec,
        TissueSpec,
    )

CELL_UM = 8.0  # grid of the low-resolution tissue field
STREAM_TISSUE, STREAM_STROMA, STREAM_NUCLEI, STREAM_TUMOUR = 1, 2, 3, 4
STREAM_ARCH, STREAM_ATYPIA = 5, 6  # multiscale task
GRANULE_UM = 0.5  # multiscale task: cell size of the cytoplasm granularity
H_MAX = 2.6  # cap on hematoxylin concentration where nuclei overlap


@dataclass
class Canvas:
    """Stain and region maps of one slide, all (height, width) at `mpp`."""

    mpp: float
    tissue: np.ndarray  # bool
    lesion: np.ndarray  # bool
    h: np.ndarray  # float32 hematoxylin concentration
    e: np.ndarray  # float32 eosin concentration
    atypia: np.ndarray | None = None  # multiscale task: bool, where nuclei are atypical
    dense: np.ndarray | None = None  # zoom task: bool, the candidate regions

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
    xs, ys = jittered_points(canvas, region, ns.density_per_mm2, rng, cluster)
    stamp_at(canvas, xs, ys, ns, rng)


def jittered_points(
    canvas: Canvas,
    region: np.ndarray,
    density_per_mm2: float,
    rng: np.random.Generator,
    cluster: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered-grid points inside `region` (one site per 1/density), of which ~80% are kept,
    more or fewer where a smooth clustering field (weight `cluster`) is high or low.

    Args:
        region: (height, width) bool; points outside it are dropped.

    Returns:
        (n,) x and (n,) y float64 pixel positions.
    """
    height, width = canvas.shape
    spacing = 1000.0 / math.sqrt(density_per_mm2) / canvas.mpp  # px between grid points
    gy, gx = np.mgrid[0 : height / spacing, 0 : width / spacing].reshape(2, -1) * spacing
    xs = gx + rng.uniform(0, spacing, gx.shape)
    ys = gy + rng.uniform(0, spacing, gy.shape)
    ix, iy = xs.astype(np.int64), ys.astype(np.int64)
    ok = (ix < width) & (iy < height)
    ok[ok] = region[iy[ok], ix[ok]]
    ny, nx = math.ceil(height * canvas.mpp / 16) + 2, math.ceil(width * canvas.mpp / 16) + 2
    density = upsample(smooth_noise(rng, (ny, nx), 3.0), 16.0, canvas)
    ok[ok] &= rng.uniform(0, 1, int(ok.sum())) < 0.8 + cluster * 0.3 * density[iy[ok], ix[ok]]
    return xs[ok], ys[ok]


def stamp_at(
    canvas: Canvas,
    xs: np.ndarray,
    ys: np.ndarray,
    ns: NucleiSpec,
    rng: np.random.Generator,
    atypia: AtypiaSpec | None = None,
    theta: np.ndarray | None = None,
) -> None:
    """Add nuclei of population `ns` centred at pixel positions (xs, ys), each (n,).

    With `atypia`, the nuclei get a crenated outline, chromatin clumps and a nucleolus, with the
    same size and the same integrated hematoxylin as they would have without it. `theta` (n,)
    fixes the orientations (radians) instead of drawing them.
    """
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
    if theta is not None:
        params["theta"] = np.asarray(theta, np.float64)
    reach = 1 + ns.irregularity
    if atypia is not None:
        params.update(_atypia_params(rng, params, atypia, canvas.mpp))
        reach += 3 * atypia.crenation
    k = 2 * math.ceil(float(params["rx"].max()) * reach + 1) + 1
    flat_h = canvas.h.reshape(-1)
    for start in range(0, n, 1024):
        sl = slice(start, start + 1024)
        chunk = {a: b[sl] for a, b in params.items()}
        if atypia is None:
            windows = _nucleus_windows(xs[sl], ys[sl], chunk, k, ns.chromatin, rng, canvas.shape)
        else:
            windows = _atypical_windows(
                xs[sl], ys[sl], chunk, k, atypia, ns.chromatin, canvas.shape
            )
        np.add.at(flat_h, windows[1], windows[0])
    np.minimum(canvas.h, np.float32(H_MAX), out=canvas.h)


def _window_geometry(xs, ys, p, k, shape):
    """Normalised nucleus coordinates on (n, k, k) windows and their flat canvas indices.

    Returns:
        (u, v, rho, r_px, idx, valid): u, v (n, k, k) along the axes in units of rx, ry; rho the
        radius relative to the wobbly outline; r_px (n, 1, 1) geometric-mean radius; idx (n, k, k)
        flat canvas indices; valid (n, k, k) in-bounds mask.
    """
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
    for j in range(p["cren"].shape[1] if "cren" in p else 0):  # crenation: harmonics 5, 6, 7
        wob += p["cren"][:, j, None, None] * np.cos((5 + j) * ang + p["cphase"][:, j, None, None])
    rho = np.sqrt(u * u + v * v) / wob
    r_px = np.sqrt(p["rx"] * p["ry"]).astype(np.float32)[:, None, None]
    yy = iy[:, None, None] + d.astype(np.int64)[None, :, None]  # (n, k, 1)
    xx = ix[:, None, None] + d.astype(np.int64)[None, None, :]  # (n, 1, k)
    valid = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    idx = np.broadcast_to(yy * width + xx, rho.shape)
    return u, v, rho, r_px, idx, valid


def _nucleus_windows(xs, ys, p, k, chromatin, rng, shape):
    """Per-nucleus (n, k, k) stamps and their flat canvas indices (in-bounds only)."""
    _, _, rho, r_px, idx, valid = _window_geometry(xs, ys, p, k, shape)
    val = np.clip((1 - rho) * r_px + 0.5, 0, 1)  # soft 1-px edge
    val *= (1 - chromatin) + chromatin * rng.uniform(0, 1, val.shape).astype(np.float32)
    val *= (0.85 + 0.3 * np.minimum(rho, 1)) * p["stain"].astype(np.float32)[:, None, None]
    inside = (val > 0) & valid
    return val[inside], idx[inside]


# ------------------------------------------------------------------ multiscale task (two cues)
def paint_cue_regions(canvas: Canvas, spec: SlideSpec) -> None:
    """Multiscale task: where nuclei are atypical (``canvas.atypia``).

    Atypia regions are the lesions (both cues) and the cell decoys; architecture regions (the
    lesions and the architecture decoys) are drawn by ``paint_cue_nuclei``. Unlike the lesion
    task's, these regions keep the tissue's lumens and stroma, and ``canvas.lesion`` stays
    empty: only the two cues tell them from normal tissue.
    """
    regions = [r.outline_um() for r in spec.lesions + spec.cell_decoys]
    canvas.atypia = polygon_mask(canvas, regions) & canvas.tissue


_SIGNS = np.array(  # the 6 ways to put two +1 and two -1 in a 2x2 block
    [
        [[1, 1], [-1, -1]],
        [[1, -1], [1, -1]],
        [[1, -1], [-1, 1]],
        [[-1, 1], [1, -1]],
        [[-1, 1], [-1, 1]],
        [[-1, -1], [1, 1]],
    ],
    np.float32,
)


def paint_granular_cytoplasm(canvas: Canvas, spec: SlideSpec) -> None:
    """Multiscale task: granular cytoplasm in the atypia regions.

    Eosin is multiplied by ``1 +- granularity`` on 0.5 µm cells, two up and two down in every
    1 µm block, so every block keeps its mean eosin: plain at 0.5 µm/px, gone (bar a slight
    Beer-Lambert brightening) at 1 µm/px and coarser.
    """
    at = spec.atypia
    regions = spec.lesions + spec.cell_decoys
    if not regions or at.granularity <= 0:
        return
    rng = np.random.default_rng([spec.seed, STREAM_ATYPIA, 1])
    lo = np.floor(np.min([r.outline_um().min(0) for r in regions], 0)).astype(int)  # (x, y) µm
    hi = np.ceil(np.max([r.outline_um().max(0) for r in regions], 0)).astype(int)
    nbx, nby = hi - lo
    blocks = _SIGNS[rng.integers(0, len(_SIGNS), (nby, nbx))]  # (nby, nbx, 2, 2)
    cells = blocks.transpose(0, 2, 1, 3).reshape(2 * nby, 2 * nbx)  # 0.5 µm cells
    height, width = canvas.shape
    px0, py0 = (lo / canvas.mpp).astype(int)
    px1, py1 = min(math.ceil(hi[0] / canvas.mpp), width), min(math.ceil(hi[1] / canvas.mpp), height)
    px0, py0 = max(px0, 0), max(py0, 0)
    cy = ((np.arange(py0, py1) + 0.5) * canvas.mpp - lo[1]) // GRANULE_UM  # pixel -> cell
    cx = ((np.arange(px0, px1) + 0.5) * canvas.mpp - lo[0]) // GRANULE_UM
    cy = np.clip(cy.astype(int), 0, 2 * nby - 1)
    cx = np.clip(cx.astype(int), 0, 2 * nbx - 1)
    grain = cells[cy[:, None], cx[None, :]]  # (h, w) in {-1, 1}
    gain = 1 + np.float32(at.granularity) * grain
    inside = canvas.atypia[py0:py1, px0:px1]
    canvas.e[py0:py1, px0:px1][inside] *= gain[inside]


def paint_cue_nuclei(canvas: Canvas, spec: SlideSpec) -> None:
    """Multiscale task: nuclei scattered on a jittered grid, but lined up in cords in the
    architecture regions (same mean density), and atypical (same size, density and integrated
    stain) in the atypia regions."""
    rng = np.random.default_rng([spec.seed, STREAM_NUCLEI])
    arch = spec.lesions + spec.arch_decoys
    scattered = canvas.tissue & ~polygon_mask(canvas, [r.outline_um() for r in arch])
    xs, ys = jittered_points(canvas, scattered, spec.nuclei.density_per_mm2, rng, cluster=0.5)
    groups = [(xs, ys, None)]
    for i, region in enumerate(arch):
        cord_rng = np.random.default_rng([spec.seed, STREAM_ARCH, i])
        groups.append(cord_points(canvas, region, spec, cord_rng))
    atypia_rng = np.random.default_rng([spec.seed, STREAM_ATYPIA])
    for xs, ys, theta in groups:
        atypical = canvas.atypia[ys.astype(np.int64), xs.astype(np.int64)]
        for sel, r, at in ((~atypical, rng, None), (atypical, atypia_rng, spec.atypia)):
            th = None if theta is None else theta[sel]
            stamp_at(canvas, xs[sel], ys[sel], spec.nuclei, r, at, theta=th)


def cord_points(canvas: Canvas, region, spec: SlideSpec, rng: np.random.Generator):
    """Nuclei in parallel, slightly wavy cords of ``cord_rows`` staggered rows filling `region`
    (tissue only), with as many nuclei per area as ``jittered_points`` at the slide's density.

    Returns:
        (n,) x, (n,) y pixel positions and (n,) orientations (along the cords).
    """
    arch = spec.architecture
    gap = rng.uniform(*arch.cord_gap_um)  # between cord centre lines
    step = arch.cord_rows * 1e6 / (spec.nuclei.density_per_mm2 * gap)  # one site per 1/density
    angle, wave = rng.uniform(0, np.pi), rng.uniform(*arch.cord_wave_um)
    reach = region.max_radius_um + gap
    a = np.arange(-reach, reach, step) + rng.uniform(0, step)  # along the cords, microns
    cords = np.arange(-reach, reach, gap) + rng.uniform(0, gap)  # across
    phase = rng.uniform(0, 2 * np.pi, len(cords))
    rows = np.arange(arch.cord_rows) - (arch.cord_rows - 1) / 2
    aa, kk, rr = (m.ravel() for m in np.meshgrid(a, np.arange(len(cords)), rows, indexing="ij"))
    aa = aa + rr * step / 2 + rng.uniform(-0.15, 0.15, aa.shape) * step  # staggered rows
    amp = arch.cord_wave_amp * gap
    ph = 2 * np.pi * aa / wave + phase[kk]
    bb = cords[kk] + amp * np.sin(ph) + rr * arch.row_um + rng.normal(0, 0.6, aa.shape)
    theta = angle + np.arctan(amp * 2 * np.pi / wave * np.cos(ph)) + rng.normal(0, 0.2, aa.shape)
    c, s = math.cos(angle), math.sin(angle)
    x = (region.center_um[0] + c * aa - s * bb) / canvas.mpp
    y = (region.center_um[1] + s * aa + c * bb) / canvas.mpp
    keep = rng.uniform(0, 1, aa.shape) < 0.8  # the mean keep rate of jittered_points
    height, width = canvas.shape
    keep &= (x >= 0) & (x < width) & (y >= 0) & (y < height)
    inside = polygon_mask(canvas, [region.outline_um()]) & canvas.tissue
    keep[keep] = inside[y[keep].astype(np.int64), x[keep].astype(np.int64)]
    return x[keep], y[keep], theta[keep]


def _atypia_params(rng: np.random.Generator, p: dict, at: AtypiaSpec, mpp: float) -> dict:
    """Per-nucleus atypia parameters for `p`'s nuclei (radii shrunk to keep the area)."""
    n = len(p["rx"])
    cren = at.crenation * rng.uniform(0.5, 1.5, (n, 3))
    area = np.sqrt(1 + 0.5 * (cren**2).sum(1))  # outline harmonics enlarge the area
    radius = np.sqrt(rng.uniform(0, 0.6, (n, at.clumps)))
    angle = rng.uniform(0, 2 * np.pi, (n, at.clumps))
    return {  # `size` enlarges the nucleus and spreads the same integrated stain over it
        "rx": p["rx"] / area * at.size,
        "ry": p["ry"] / area * at.size,
        "stain": p["stain"] / at.size**2,
        "cren": cren,
        "cphase": rng.uniform(0, 2 * np.pi, (n, 3)),
        "clump_u": radius * np.cos(angle),
        "clump_v": radius * np.sin(angle),
        "nucleolus": rng.uniform(-0.15, 0.15, (n, 2)),
        "clump_px": np.full(n, at.clump_um / mpp),
        "nucleolus_px": np.full(n, at.nucleolus_um / mpp),
    }


def _atypical_windows(xs, ys, p, k, at, chromatin, shape):
    """Atypical (vesicular) nuclei: a thick membrane, chromatin clumps and a nucleolus on a pale
    nucleoplasm, with the integrated stain of a normal nucleus of the same outline."""
    u, v, rho, r_px, idx, valid = _window_geometry(xs, ys, p, k, shape)
    val = np.clip((1 - rho) * r_px + 0.5, 0, 1)  # soft 1-px edge
    tex = np.float32(at.rim) * np.exp(-(((rho - 0.85) / 0.15) ** 2))  # membrane
    s2 = 2 * (p["clump_px"].astype(np.float32)[:, None, None] / r_px) ** 2  # (n, 1, 1)
    for j in range(p["clump_u"].shape[1]):
        du = u - p["clump_u"][:, j, None, None].astype(np.float32)
        dv = v - p["clump_v"][:, j, None, None].astype(np.float32)
        tex += np.exp(-(du * du + dv * dv) / s2)
    s2 = 2 * (p["nucleolus_px"].astype(np.float32)[:, None, None] / r_px) ** 2
    du = u - p["nucleolus"][:, 0, None, None].astype(np.float32)
    dv = v - p["nucleolus"][:, 1, None, None].astype(np.float32)
    tex += np.float32(at.nucleolus_weight) * np.exp(-(du * du + dv * dv) / s2)
    mean = (val * tex).sum((1, 2), keepdims=True) / np.maximum(val.sum((1, 2), keepdims=True), 1)
    tex = (1 - at.contrast) + at.contrast * tex / np.maximum(mean, 1e-6)  # mean 1 in the nucleus
    val *= tex * np.float32((1 - chromatin / 2) * at.stain)  # normal: mean speckle 1 - c/2
    val *= (0.85 + 0.3 * np.minimum(rho, 1)) * p["stain"].astype(np.float32)[:, None, None]
    inside = (val > 0) & valid
    return val[inside], idx[inside]


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
