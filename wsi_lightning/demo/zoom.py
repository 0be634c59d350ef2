"""Demo task ``"zoom"``: find the candidate regions at low magnification, decide at high.

The task the coarse-to-fine methods (MagNets, HAG-MIL) are built for, on slides large enough
that reading every tile at full resolution costs many times what a targeted look does:

    - Slides are 2 mm square (4096 px at 0.5 µm/px, 4 pyramid levels, about 700 tissue tiles
      of 56 µm per slide), with the lesion task's nuisance variation (stain vectors and
      strengths, nuclear density and size, fibre texture, tissue coverage 35-60%).
    - Every slide, whatever its label, has ``n_candidates`` (4) *candidate regions*
      (100-170 µm radius): dense cellular areas, 3x the slide's nuclear density on solid tissue
      with less, bluer cytoplasm. They are visible at every magnification, down to a 32-64 px
      thumbnail of the whole slide (dark purple spots of 5-10 px).
    - Tumour slides carry the *deciding cue* in 2 or 3 of their candidates (the lesions,
      annotated ``Tumor``; the others ``Candidate``): the same number of nuclei per area, but
      lined up in parallel cords (2 rows, 30-40 µm apart: the multiscale task's architecture,
      finer) and atypical (vesicular: crenated outline, thick membrane, chromatin clumps, nucleolus;
      1.3x the radius with the same integrated stain). Normal slides have the cue nowhere.
    - The cue needs magnification: the cords are plain from 8 µm/px down and the atypia at
      0.5-1 µm/px, while a lesion's mean colour is matched to that of the same region drawn as
      a plain candidate, so on a thumbnail (32 µm/px and coarser) a lesion looks like the other
      candidates.
      ``bench/check_zoom_demo.py`` measures both kinds of region at each magnification, the
      regions' colour on the thumbnail, and slide-level shortcuts (tissue amount, dark area,
      colour, size) that must stay at chance.

So a model that only sees the slide as a thumbnail counts the same candidates in both classes
and is at chance; one that reads every tile at 0.5 µm/px finds the cue at ~20x the pixels of
one that zooms into the four candidates.

The painters here follow ``paint.py``'s contract (``painter(canvas, spec)``, one random stream
each); ``synthetic.sample_zoom_regions`` draws the regions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.path import Path as MplPath

from wsi_lightning.demo import paint

if TYPE_CHECKING:
    from wsi_lightning.demo.specs import SlideSpec

STREAM_DENSE = 7  # nuclei of the candidate regions


@dataclass(frozen=True)
class ZoomSpec:
    """What makes a candidate region and how many a slide has."""

    n_candidates: int = 4  # per slide, both classes
    lesions: tuple[int, int] = (2, 3)  # tumour slides: candidates with the cue, uniform in this range
    radius_um: tuple[float, float] = (100.0, 170.0)  # log-uniform
    density_factor: float = 3.0  # nuclei per area, relative to the slide's
    cytoplasm: float = 0.8  # eosin factor on the stroma (less cytoplasm between the cells)
    haze: float = 0.25  # extra background hematoxylin (bluer)


ZOOM = ZoomSpec()
DEFAULTS = {"size_um": 2048.0}  # demo options of the task (demo/dataset.py TASK_DEFAULTS)


def paint_regions(canvas: paint.Canvas, spec: SlideSpec) -> None:
    """Candidate regions (lesions included) become solid tissue, marked in ``canvas.dense``."""
    regions = spec.lesions + spec.candidates
    canvas.dense = paint.polygon_mask(canvas, [r.outline_um() for r in regions])
    canvas.tissue |= canvas.dense


def paint_dense_stroma(canvas: paint.Canvas, spec: SlideSpec) -> None:
    """Less, bluer cytoplasm between the packed cells of every candidate region."""
    z = spec.zoom
    canvas.e[canvas.dense] *= np.float32(z.cytoplasm)
    canvas.h[canvas.dense] += np.float32(z.haze)


def paint_nuclei(canvas: paint.Canvas, spec: SlideSpec) -> None:
    """The slide's scattered nuclei outside the candidates; packed nuclei inside them, lined up
    in cords and atypical in the lesions (as many per area as in the other candidates).

    Each region draws its nuclei from its own stream (regions in centre order), so turning a
    candidate into a lesion changes the pixels of that region only. A lesion's nuclear stain is
    then scaled so that its mean colour is that of the same region drawn as a plain candidate
    (see :func:`_match_colour`): cords and large pale nuclei transmit more light on average
    (Beer-Lambert is convex), which would otherwise show the cue on a thumbnail.
    """
    rng = np.random.default_rng([spec.seed, paint.STREAM_NUCLEI])
    density = spec.nuclei.density_per_mm2
    xs, ys = paint.jittered_points(canvas, canvas.tissue & ~canvas.dense, density, rng, 0.5)
    paint.stamp_at(canvas, xs, ys, spec.nuclei, rng)
    dense_rng = np.random.default_rng([spec.seed, STREAM_DENSE])
    xs, ys = paint.jittered_points(
        canvas, canvas.dense, density * spec.zoom.density_factor, dense_rng, 0.2
    )
    packed = replace(spec, nuclei=replace(spec.nuclei, density_per_mm2=density * spec.zoom.density_factor))
    regions = sorted(spec.lesions + spec.candidates, key=lambda r: r.center_um)
    for i, region in enumerate(regions):
        region_rng = np.random.default_rng([spec.seed, STREAM_DENSE, i])  # what a candidate draws
        inside = _in_region(region, xs, ys, canvas.mpp)
        if region not in spec.lesions:
            paint.stamp_at(canvas, xs[inside], ys[inside], spec.nuclei, region_rng)
            continue
        box = _box(canvas, region)
        before = canvas.h[box].copy()
        plain = _crop(canvas, box)
        paint.stamp_at(plain, xs[inside] - box[1].start, ys[inside] - box[0].start, spec.nuclei,
                       np.random.default_rng([spec.seed, STREAM_DENSE, i]))  # as a candidate
        cx, cy, theta = paint.cord_points(canvas, region, packed, region_rng)  # the cue
        paint.stamp_at(canvas, cx, cy, spec.nuclei, region_rng, spec.atypia, theta=theta)
        _match_colour(canvas, box, region, before, plain, spec)


def _in_region(region, xs: np.ndarray, ys: np.ndarray, mpp: float) -> np.ndarray:
    """(n,) bool: pixel positions (xs, ys) inside the region's outline."""
    return MplPath(region.outline_um() / mpp).contains_points(np.stack([xs, ys], 1))


def _box(canvas: paint.Canvas, region) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices of a region's bounding box plus 10 µm."""
    (x0, y0), (x1, y1) = region.outline_um().min(0) - 10, region.outline_um().max(0) + 10
    height, width = canvas.shape
    to_px = 1 / canvas.mpp
    return (slice(max(int(y0 * to_px), 0), min(int(y1 * to_px) + 1, height)),
            slice(max(int(x0 * to_px), 0), min(int(x1 * to_px) + 1, width)))


def _crop(canvas: paint.Canvas, box: tuple[slice, slice]) -> paint.Canvas:
    """A copy of the canvas inside `box` (a scratch canvas to paint on)."""
    return paint.Canvas(canvas.mpp, canvas.tissue[box].copy(), canvas.lesion[box].copy(),
                        canvas.h[box].copy(), canvas.e[box].copy())


def _match_colour(canvas: paint.Canvas, box, region, before: np.ndarray, plain: paint.Canvas,
                  spec: SlideSpec) -> None:
    """Scale the stain the cue added in `box` (``canvas.h - before``) so that the region's mean
    transmitted light equals the plain version's (12 bisection steps on the gain in [0.5, 3])."""
    added = canvas.h[box] - before
    offset = np.array([box[1].start, box[0].start]) * canvas.mpp  # (x, y) µm of the box corner
    inside = paint.polygon_mask(plain, [region.outline_um() - offset]) & plain.tissue
    if not inside.any():
        return
    target = _light(plain, spec, inside)
    lo, hi = 0.5, 3.0
    trial = _crop(canvas, box)
    for _ in range(12):
        gain = (lo + hi) / 2
        trial.h = np.minimum(before + gain * added, np.float32(paint.H_MAX))
        lo, hi = (gain, hi) if _light(trial, spec, inside) > target else (lo, gain)
    canvas.h[box] = np.minimum(before + np.float32((lo + hi) / 2) * added, np.float32(paint.H_MAX))


def _light(canvas: paint.Canvas, spec: SlideSpec, where: np.ndarray) -> float:
    """Mean transmitted light (RGB summed) over `where`."""
    return float(paint.compose(canvas, spec.palette)[where].astype(np.float64).sum(-1).mean())


PAINTERS = (
    paint.paint_tissue,
    paint_regions,
    paint.paint_stroma,
    paint_dense_stroma,
    paint_nuclei,
)
