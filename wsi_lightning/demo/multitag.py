"""Synthetic multi-tag slides (Patch Transformer-style data): stain, species and organ tags.

Every slide of demo task ``"multitag"`` carries three single-label tags, each visible in any
tissue patch of 56-112 µm (112-224 px at 0.5 µm/px):

    stain    3 classes, the colour palette of the whole slide: ``he`` (blue-purple nuclei, pink
             eosin), ``ihc_dab`` (pale blue counterstain, tan background, 20-50% of the nuclei
             brown DAB-positive), ``special`` (trichrome-like: dark iron-hematoxylin nuclei, blue
             aniline collagen and cytoplasm).
    species  6 classes, the cells: nuclear size (small / medium / large) x shape (round /
             elongated), plus chromatin and outline texture (``SPECIES_NUCLEI``). The organ's
             nuclear density is scaled by the species' nuclear area, so the share of the tissue
             covered by nuclei says little about the species; the size and shape of each do.
    organ    12 classes, the tissue architecture (``ORGAN_LAYOUTS``): hepatocyte plates and
             sinusoids (liver), stratified bands (skin), alveolar septa (lung), acini (pancreas),
             crypts (colon), tubules and glomeruli (kidney), ducts in collagen and fat (breast),
             neuropil with haloed glia (brain), lymphoid follicles and red pulp (spleen), villi
             (intestine), striated fibres (heart), trabeculae and marrow (bone).

Tags are correlated and imbalanced in the spirit of the paper's Table 1 (``PAPER_COUNTS``; 12 of
its 16 organs: cecum, prostate and the two skin sub-sites are left out): mouse is most slides,
monkey and pig few; class counts follow the paper's proportions with a floor of
``MIN_PER_CLASS`` per class (``class_counts``); the species sways the stain (``STAIN_AFFINITY``:
zebrafish and rat mostly H&E, human and monkey mostly IHC) and the organ (``ORGAN_AFFINITY``:
zebrafish have no lung, breast or colon; human slides are often skin or breast). Counts are
fixed by the number of slides; who gets what is drawn from the seed (``plan_slides``). Slides of
one case share their species. The default set (``DEMO_DEFAULTS``: 360 slides of 1024 µm, ~50 s
on 2 cores) has every class of every tag in train and test of the default patient-level split.

Nuisance, unrelated to the tags: palette jitter and strength, tissue outline and coverage,
pattern scale (+-10%), orientation and warp, nuclear size (+-6%) and stain.

``render`` in ``synthetic.py`` draws these specs with ``PAINTERS``: the usual tissue outline,
then ``paint_tags`` (architecture, nuclei, stain-specific parts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from wsi_lightning.demo import paint
from wsi_lightning.demo.specs import NucleiSpec, Palette, SlideSpec, StromaSpec, TissueSpec

TAGS = ("stain", "species", "organ")
STAINS = ("he", "ihc_dab", "special")
SPECIES = ("human", "monkey", "mouse", "pig", "rat", "zebrafish")
ORGANS = (
    "bone", "brain", "breast", "colon", "heart", "intestine",
    "kidney", "liver", "lung", "pancreas", "skin", "spleen",
)  # fmt: skip
CLASSES = {"stain": STAINS, "species": SPECIES, "organ": ORGANS}
PAPER_COUNTS = {  # Patch Transformer paper, Table 1 (4,920 WSIs); organs drawn here only
    "stain": {"he": 2803, "ihc_dab": 1672, "special": 445},
    "species": {"human": 816, "monkey": 29, "mouse": 3435, "pig": 33, "rat": 439, "zebrafish": 168},
    "organ": {
        "bone": 89, "brain": 238, "breast": 264, "colon": 338, "heart": 160, "intestine": 186,
        "kidney": 335, "liver": 901, "lung": 644, "pancreas": 347, "skin": 752, "spleen": 204,
    },
}  # fmt: skip
MIN_PER_CLASS = 6  # floor on every class's count (when the slides allow it)
# 360 slides: PT-3head-MTA on demo_filters features (pt_3head_mta_features) reached test
# macro-F1 0.59 averaged over the tags with 120 slides (68 for training, seed 0), 0.80 with 360
# (197 for training; seeds 0-2: organ 0.93, species 0.46, stain 1.0)
DEMO_DEFAULTS = {"n_slides": 360, "size_um": 1024.0}  # ~50 s on 2 idle cores
# species -> organ weight (missing: 1; 0 = never): who studies what
ORGAN_AFFINITY = {
    "human": {"breast": 3, "skin": 3, "lung": 2, "colon": 2, "bone": 0.3, "heart": 0.3},
    "monkey": {"brain": 3, "breast": 0.3, "skin": 0.3},
    "mouse": {},
    "pig": {"skin": 4, "heart": 3, "breast": 0, "brain": 0.3},
    "rat": {"liver": 2, "kidney": 2, "breast": 0.3, "skin": 0.5},
    "zebrafish": {"lung": 0, "breast": 0, "colon": 0, "spleen": 0.5, "pancreas": 0.5},
}
STAIN_AFFINITY = {  # species -> (he, ihc_dab, special) weights
    "human": (0.2, 0.7, 0.1),
    "monkey": (0.25, 0.65, 0.1),
    "mouse": (0.55, 0.35, 0.1),
    "pig": (0.4, 0.2, 0.4),
    "rat": (0.8, 0.1, 0.1),
    "zebrafish": (0.95, 0.0, 0.05),
}


@dataclass(frozen=True)
class SpeciesNuclei:
    """A species' nuclei: radius (µm), mean aspect ratio, outline irregularity, chromatin."""

    radius_um: float
    elongation: float
    irregularity: float
    chromatin: float


SPECIES_NUCLEI = {  # size x shape, 3 x 2 (+ texture)
    "mouse": SpeciesNuclei(2.1, 1.1, 0.03, 0.25),  # small round
    "zebrafish": SpeciesNuclei(2.0, 2.8, 0.04, 0.2),  # small spindle
    "rat": SpeciesNuclei(3.0, 1.1, 0.03, 0.3),  # medium round
    "human": SpeciesNuclei(3.0, 2.0, 0.07, 0.3),  # medium oval, irregular
    "pig": SpeciesNuclei(4.6, 1.1, 0.06, 0.4),  # large round, coarse chromatin
    "monkey": SpeciesNuclei(4.4, 2.0, 0.03, 0.35),  # large oval
}
REF_RADIUS_UM = 3.0  # organ densities are for nuclei of this radius
STREAM_LAYOUT, STREAM_CELLS, STREAM_EXTRA = 20, 21, 22


@dataclass(frozen=True)
class TagSpec:
    """A multitag slide's tags and the per-slide nuisance of their patterns."""

    stain: str
    species: str
    organ: str
    scale: float  # pattern scale factor of the organ's architecture
    angle: float  # orientation of the architecture (radians)
    dab_fraction: float  # ihc_dab: share of DAB-positive nuclei


# ------------------------------------------------------------------------------ the plan
def class_counts(n_slides: int) -> dict[str, dict[str, int]]:
    """Slides per class of every tag: the paper's proportions, at least ``MIN_PER_CLASS`` each
    (fewer when ``n_slides`` is too small), largest remainders."""
    return {tag: _quota(n_slides, PAPER_COUNTS[tag]) for tag in TAGS}


def _quota(n: int, paper: dict[str, int]) -> dict[str, int]:
    names = list(paper)
    floor = min(MIN_PER_CLASS, n // len(names))
    p = np.array([paper[c] for c in names], float)
    excess = np.maximum(n * p / p.sum() - floor, 0)  # what the floor does not already give
    share = (n - floor * len(names)) * excess / excess.sum()
    counts = floor + np.floor(share).astype(int)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return dict(zip(names, counts.tolist(), strict=True))


def plan_slides(n_slides: int, seed: int, options: dict) -> list[dict]:
    """Slide ids, cases, tags and mpps, all deterministic from `seed` (``label`` = organ).

    Args:
        n_slides: number of slides.
        seed: seed of the assignment.
        options: demo options (``frac_40x``, ``pair_fraction``, ``mpp``).

    Returns:
        One dict per slide: index, slide_id, case_id, label, mpp, stain, species, organ.
    """
    rng = np.random.default_rng([seed, 0, 1])
    counts = class_counts(n_slides)
    species = np.repeat(SPECIES, [counts["species"][s] for s in SPECIES])[rng.permutation(n_slides)]
    # rarest species first, so that they get the organs and stains they favour
    rarity = np.array([counts["species"][s] for s in species])
    order = np.lexsort((rng.permutation(n_slides), rarity))
    organ = _assign(rng, species, order, counts["organ"], lambda s, c: ORGAN_AFFINITY[s].get(c, 1))
    stain = _assign(rng, species, order, counts["stain"], lambda s, c: _stain_weight(s, c))
    fine = np.zeros(n_slides, bool)
    fine[rng.choice(n_slides, round(options["frac_40x"] * n_slides), replace=False)] = True
    case_of = _pair_cases(rng, species, round(options["pair_fraction"] * n_slides / 2))
    case_ids = {c: f"case_{j:03d}" for j, c in enumerate(sorted(set(case_of.tolist())))}
    return [
        {
            "index": i,
            "slide_id": f"demo_{i:03d}",
            "case_id": case_ids[int(case_of[i])],
            "label": str(organ[i]),
            "mpp": options["mpp"] / 2 if fine[i] else options["mpp"],
            "stain": str(stain[i]),
            "species": str(species[i]),
            "organ": str(organ[i]),
        }
        for i in range(n_slides)
    ]


def _stain_weight(species: str, stain: str) -> float:
    return STAIN_AFFINITY[species][STAINS.index(stain)]


def _assign(rng, species: np.ndarray, order: np.ndarray, quota: dict[str, int], weight):
    """One class per slide, visiting slides in `order`: drawn with probability ~ remaining quota
    x ``weight(species, class)`` (the quota alone when no allowed class is left)."""
    names, left = list(quota), np.array(list(quota.values()), float)
    out = np.empty(len(species), object)
    for i in order:
        w = left * np.array([weight(species[i], c) for c in names])
        w = w if w.sum() > 0 else left.copy()
        k = int(rng.choice(len(names), p=w / w.sum()))
        out[i], left[k] = names[k], left[k] - 1
    return out


def _pair_cases(rng, species: np.ndarray, n_pairs: int) -> np.ndarray:
    """Case index per slide: `n_pairs` pairs of slides of one species (an animal or patient
    with two slides) among the species with >= 10 slides; the other slides are cases alone."""
    case_of = np.arange(len(species))
    common = [s for s in SPECIES if (species == s).sum() >= 10]
    for k in range(n_pairs if common else 0):
        free = np.flatnonzero(
            (species == common[k % len(common)]) & (case_of == np.arange(len(species)))
        )
        free = [i for i in free if (case_of == i).sum() == 1]
        if len(free) >= 2:
            a, b = rng.choice(free, 2, replace=False)
            case_of[max(a, b)] = min(a, b)
    return case_of


# ------------------------------------------------------------------------------ the spec
def sample_spec(rng: np.random.Generator, row: dict, size_um: float, mpp: float) -> SlideSpec:
    """Draw a multitag slide for a plan row (``slide_id``, ``stain``, ``species``, ``organ``)."""
    u = rng.uniform
    blobs = tuple(
        (u(0.3, 0.7) * size_um, u(0.3, 0.7) * size_um, u(0.15, 0.3) * size_um,
         u(0.15, 0.3) * size_um, u(0, np.pi))
        for _ in range(int(rng.integers(2, 5)))
    )  # fmt: skip
    tissue = TissueSpec(blobs, u(0.4, 0.6), u(0.15, 0.3), 0.0, 15.0)
    stroma = StromaSpec(u(0.5, 0.7), u(6, 12), u(0, np.pi), u(0.3, 0.6), u(3, 8), u(0.03, 0.08))
    sp = SPECIES_NUCLEI[row["species"]]
    nuclei = NucleiSpec(
        0.0, sp.radius_um * u(0.94, 1.06), 0.12, 1 + (sp.elongation - 1) * u(0.9, 1.1),
        sp.irregularity, u(0.85, 1.1), sp.chromatin,
    )  # fmt: skip
    tags = TagSpec(
        row["stain"], row["species"], row["organ"], u(0.9, 1.1), u(0, np.pi),
        u(0.2, 0.5) if row["stain"] == "ihc_dab" else 0.0,
    )  # fmt: skip
    return SlideSpec(
        row["slide_id"], int(rng.integers(2**31)), row["organ"], size_um, size_um, mpp,
        _palette(rng, row["stain"]), tissue, stroma, nuclei, nuclei, task="multitag", tags=tags,
    )  # fmt: skip


STAIN_OD = {  # (first stain, second stain) optical densities per unit concentration (R, G, B)
    "he": ((0.65, 0.70, 0.29), (0.08, 0.95, 0.28)),  # hematoxylin, eosin
    "ihc_dab": ((0.65, 0.70, 0.29), (0.27, 0.57, 0.78)),  # hematoxylin counterstain, DAB
    "special": ((0.62, 0.68, 0.52), (0.80, 0.52, 0.12)),  # iron hematoxylin, aniline blue
}
STAIN_STRENGTH = {"he": ((0.8, 1.2), (0.75, 1.25)), "ihc_dab": ((0.5, 0.7), (0.5, 0.7)),
                  "special": ((1.2, 1.5), (0.8, 1.1))}  # fmt: skip


def _palette(rng: np.random.Generator, stain: str):
    (h_od, e_od), (h_s, e_s) = STAIN_OD[stain], STAIN_STRENGTH[stain]
    jitter = lambda v, rel: tuple(float(x * rng.uniform(1 - rel, 1 + rel)) for x in v)  # noqa: E731
    return Palette(
        jitter(h_od, 0.1), jitter(e_od, 0.1), rng.uniform(*h_s), rng.uniform(*e_s),
        jitter(Palette.background, 0.5),
    )  # fmt: skip


# ------------------------------------------------------------------------------ painting
LAYOUT_UM = 1.0  # grid of the architecture maps (upsampled to the slide's pixels)


@dataclass(frozen=True)
class Grid:
    """A pixel grid: (height, width) cells of `mpp` microns from the slide's origin (duck-types
    ``paint.Canvas`` for ``paint.upsample``)."""

    shape: tuple[int, int]
    mpp: float

    @classmethod
    def layout(cls, canvas: paint.Canvas) -> Grid:
        height, width = canvas.shape
        n = (math.ceil(height * canvas.mpp / LAYOUT_UM), math.ceil(width * canvas.mpp / LAYOUT_UM))
        return cls(n, LAYOUT_UM)


@dataclass
class Layout:
    """An organ's architecture, all maps (h, w) on the layout grid (``LAYOUT_UM`` cells).

    Attributes:
        e: float32 second-stain (eosin / DAB / aniline) concentration.
        density: float32 nuclei per mm² for nuclei of ``REF_RADIUS_UM``.
        keep: bool, False where the tissue has white space (lumens, air, fat); None = all.
        orient: float32 long-axis angle of the nuclei (radians); None = random.
        haze: background hematoxylin (scalar or float32 map).
        halo: share of the nuclei in a clear halo (brain glia, bone osteocytes).
        along: float32 coordinate (µm) across which the second stain is cross-striated with
            period ``striation_um`` at the slide's resolution (heart); None = no striations.
    """

    e: np.ndarray
    density: np.ndarray
    keep: np.ndarray | None = None
    orient: np.ndarray | None = None
    haze: float | np.ndarray = 0.05
    halo: float = 0.0
    along: np.ndarray | None = None
    striation_um: float = 2.0


def paint_tags(canvas: paint.Canvas, spec: SlideSpec) -> None:
    """Multitag task: the organ's architecture, the species' nuclei, the stain's extras."""
    grid = Grid.layout(canvas)
    layout = ORGAN_LAYOUTS[spec.tags.organ](
        grid, spec, np.random.default_rng([spec.seed, STREAM_LAYOUT])
    )
    up = lambda a: paint.upsample(np.asarray(a, np.float32), grid.mpp, canvas)  # noqa: E731
    if layout.keep is not None:
        canvas.tissue &= up(layout.keep) > 0.5
    e = up(layout.e)
    if layout.along is not None:  # cross-striations, finer than the layout grid
        phase = up(layout.along) * np.float32(2 * np.pi / layout.striation_um)
        e = e * (1 + np.float32(0.25) * np.sin(phase))
    zero = np.float32(0)
    canvas.e = np.where(canvas.tissue, e, zero)
    haze = up(layout.haze) if isinstance(layout.haze, np.ndarray) else np.float32(layout.haze)
    canvas.h = np.where(canvas.tissue, haze, zero).astype(np.float32)
    rng = np.random.default_rng([spec.seed, STREAM_CELLS])
    xs, ys = _nucleus_points(canvas, up(layout.density), spec.nuclei.radius_um, rng)
    theta = None
    if layout.orient is not None:
        k = canvas.mpp / grid.mpp
        theta = layout.orient[(ys * k).astype(np.int64), (xs * k).astype(np.int64)]
        theta = theta + rng.normal(0, 0.2, len(xs))
    if layout.halo > 0:
        halo = rng.uniform(0, 1, len(xs)) < layout.halo
        clear = _discs(canvas.shape, xs[halo], ys[halo], 2.0 * spec.nuclei.radius_um / canvas.mpp)
        canvas.e[clear] *= np.float32(0.1)
        canvas.h[clear] = 0
    _stamp(canvas, spec, xs, ys, theta, rng)


def _stamp(canvas, spec: SlideSpec, xs, ys, theta, rng) -> None:
    """Species nuclei at (xs, ys); with ``ihc_dab``, a share of them brown (second stain, a
    little counterstain) instead of blue."""
    positive = rng.uniform(0, 1, len(xs)) < spec.tags.dab_fraction
    sel = lambda a, m: None if a is None else a[m]  # noqa: E731
    paint.stamp_at(
        canvas, xs[~positive], ys[~positive], spec.nuclei, rng, theta=sel(theta, ~positive)
    )
    if positive.any():
        dab = paint.Canvas.empty(*canvas.shape, canvas.mpp)
        paint.stamp_at(
            dab, xs[positive], ys[positive], spec.nuclei, rng, theta=sel(theta, positive)
        )
        canvas.e += dab.h * np.float32(1.1 / spec.palette.e_strength)
        canvas.h += dab.h * np.float32(0.2)


def _nucleus_points(canvas, density: np.ndarray, radius_um: float, rng) -> tuple:
    """Nuclei positions following `density` ((H, W) per mm², scaled by the species' nuclear
    area so that nuclei cover about the same share of the tissue for every species).

    Returns:
        (n,) x and (n,) y float64 pixel positions inside the tissue.
    """
    factor = float(np.clip((REF_RADIUS_UM / radius_um) ** 2, 0.5, 2.0))
    region = canvas.tissue & (density > 1)
    if not region.any():
        return np.zeros(0), np.zeros(0)
    top = float(density[region].max())
    xs, ys = paint.jittered_points(canvas, region, top * factor / 0.8, rng, cluster=0.2)
    keep = rng.uniform(0, 1, len(xs)) * top < density[ys.astype(np.int64), xs.astype(np.int64)]
    return xs[keep], ys[keep]


def _discs(shape: tuple[int, int], xs, ys, r_px) -> np.ndarray:
    """(H, W) bool union of discs of radius `r_px` (scalar or (n,)) at pixel centres (n,)."""
    img = Image.new("1", shape[::-1], 0)
    draw = ImageDraw.Draw(img)
    radii = np.broadcast_to(r_px, np.shape(xs)).tolist()
    for x, y, r in zip(np.asarray(xs).tolist(), np.asarray(ys).tolist(), radii, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=1)
    return np.asarray(img)


def _random_discs(grid: Grid, rng, per_mm2: float, radius_um: tuple[float, float]) -> np.ndarray:
    """Discs at uniform random places (Poisson count), radii uniform in `radius_um`. (h, w)."""
    height, width = grid.shape
    n = int(rng.poisson(per_mm2 * height * width * grid.mpp**2 / 1e6))
    xs, ys = rng.uniform(0, width, n), rng.uniform(0, height, n)
    return _discs(grid.shape, xs, ys, rng.uniform(*radius_um, n) / grid.mpp)


def _frame(grid: Grid, spec: SlideSpec, rng, warp_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Warped, rotated micron coordinates (u, v) of the grid's cell centres, each (h, w)
    float32, divided by the slide's pattern scale."""
    height, width = grid.shape
    x = (np.arange(width, dtype=np.float32) + 0.5) * np.float32(grid.mpp)
    y = (np.arange(height, dtype=np.float32) + 0.5) * np.float32(grid.mpp)
    c, s = np.float32(math.cos(spec.tags.angle)), np.float32(math.sin(spec.tags.angle))
    k = np.float32(1 / spec.tags.scale)
    u = _field(grid, rng, 24.0, 2.0) * np.float32(warp_um)
    u += x[None, :] * c + y[:, None] * s
    v = _field(grid, rng, 24.0, 2.0) * np.float32(warp_um)
    v += y[:, None] * c - x[None, :] * s
    return u * k, v * k


def _field(grid: Grid, rng, cell_um: float, sigma_cells: float = 1.0) -> np.ndarray:
    """Smooth zero-mean unit-sd noise on `cell_um` cells, on the grid. Returns (h, w) float32."""
    height, width = grid.shape
    ny = math.ceil(height * grid.mpp / cell_um) + 2
    nx = math.ceil(width * grid.mpp / cell_um) + 2
    noise = paint.smooth_noise(rng, (ny, nx), sigma_cells)
    return noise[:height, :width] if cell_um == grid.mpp else paint.upsample(noise, cell_um, grid)


def _hex_cells(u: np.ndarray, v: np.ndarray, spacing: float):
    """Nearest and second-nearest points of a triangular lattice (`spacing` apart); of the 4
    corners of the lattice rhombus around a point, which hold both where they matter.

    Returns:
        (d1, d2, du, dv, uid), each like `u`: distances to the two points, the vector from the
        nearest point to the pixel, and the nearest point's integer id.
    """
    row = np.float32(spacing * math.sqrt(3) / 2)
    j0 = np.floor(v / row)
    i0 = np.floor(u / np.float32(spacing) - (v / row) / 2)
    d1 = np.full(u.shape, np.inf, np.float32)
    d2, du, dv, uid = d1.copy(), np.zeros_like(u), np.zeros_like(v), np.zeros(u.shape, np.int32)
    for di in (0, 1):
        for dj in (0, 1):
            ci, cj = i0 + np.float32(di), j0 + np.float32(dj)
            eu = u - (ci + cj / 2) * np.float32(spacing)
            ev = v - cj * row
            d = eu * eu + ev * ev
            closer = d < d1
            np.copyto(d2, np.where(closer, d1, np.minimum(d2, d)))
            np.copyto(d1, d, where=closer)
            np.copyto(du, eu, where=closer)
            np.copyto(dv, ev, where=closer)
            np.copyto(uid, (ci * 7919 + cj).astype(np.int32), where=closer)
    return np.sqrt(d1), np.sqrt(d2), du, dv, uid


def _unit_random(uid: np.ndarray, salt: int) -> np.ndarray:
    """A uniform [0, 1) number per lattice unit id (a hash). Returns uid's shape, float32."""
    h = np.sin(uid.astype(np.float64) * 12.9898 + salt * 78.233) * 43758.5453
    return (h - np.floor(h)).astype(np.float32)


def _stripes(t: np.ndarray, period: float) -> np.ndarray:
    """Position within a period, in [0, 1). Returns t's shape, float32."""
    q = t / np.float32(period)
    return (q - np.floor(q)).astype(np.float32)


def _angle(spec: SlideSpec, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Image angle (radians) of frame vectors (du, dv)."""
    return (np.arctan2(dv, du) + np.float32(spec.tags.angle)).astype(np.float32)


def _grain(grid: Grid, rng, amount: float, cell_um: float = 1.0) -> np.ndarray:
    """Fine multiplicative texture ``1 + amount * noise`` on `cell_um` cells. (h, w) float32."""
    return 1 + np.float32(amount) * _field(grid, rng, cell_um, 0.7)


def _collagen(grid: Grid, spec: SlideSpec, rng, v: np.ndarray, contrast: float) -> np.ndarray:
    """Wavy collagen fibres along u (stripes across `v`), in [1 - contrast, 1]. (h, w)."""
    st = spec.stroma
    warp = _field(grid, rng, 16.0, 3.0) * np.float32(st.waviness)
    phase = v * np.float32(2 * np.pi / st.fibre_um) + warp
    return 1 - np.float32(contrast) * (0.5 + 0.5 * np.sin(phase))


def _where(cond: np.ndarray, a, b) -> np.ndarray:
    """``np.where`` of scalars or maps, as float32."""
    return np.where(cond, a, b).astype(np.float32, copy=False)


def _liver(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Hepatocyte plates two cells thick (22 µm polygonal cells, one central nucleus, granular
    pink cytoplasm, darker borders) between white sinusoids."""
    u, v = _frame(grid, spec, rng, 6.0)
    d1, d2, _, _, _ = _hex_cells(u, v, 22.0)
    sinusoid = _stripes(v + 3 * np.sin(u / np.float32(15)), 22.0 * math.sqrt(3)) < 0.14
    e = np.float32(0.6) * _grain(grid, rng, 0.25) + np.float32(0.25) * (d2 - d1 < 1.2)
    density = _where(d1 < 3.0, 1e6 / (math.pi * 9.0), 0)  # about one nucleus per cell
    return Layout(e, density, keep=~sinusoid, haze=0.08)


def _skin(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Stratified bands (period 110 µm): dense epidermis flattening towards laminated keratin
    with clefts, fibrous dermis with few nuclei."""
    u, v = _frame(grid, spec, rng, 12.0)
    f = _stripes(v, 110.0)
    epi, ker = f < 0.35, (f >= 0.35) & (f < 0.5)
    lam = np.sin(v * np.float32(2 * np.pi / 3.5))
    e = _where(epi, 0.45, np.float32(0.6) * _collagen(grid, spec, rng, v, 0.5))
    e = _where(ker, np.float32(0.75) + np.float32(0.2) * lam, e)
    density = _where(epi, np.float32(9000) * (1.2 - f / 0.35 * 0.6), 700)
    density[ker] = 0
    orient = np.full(grid.shape, np.float32(spec.tags.angle))
    return Layout(e, density, keep=~(ker & (lam > 0.55)), orient=orient, haze=0.06)


def _lung(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Alveoli: a lace of thin cellular septa (zero crossings of a 16 µm noise) around air."""
    n = _field(grid, rng, 2.0 * spec.tags.scale, 8.0)
    septum = np.abs(n) < 0.42
    gy, gx = np.gradient(n)
    orient = (np.arctan2(gy, gx) + np.float32(np.pi / 2)).astype(np.float32)
    e = np.float32(0.55) * _grain(grid, rng, 0.2)
    return Layout(e, _where(septum, 7000, 0), keep=septum, orient=orient, haze=0.06)


def _pancreas(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Acini (32 µm): a ring of basal nuclei in basophilic cytoplasm around bright granular
    apical cytoplasm and a pin-point lumen; pale septa between acini."""
    u, v = _frame(grid, spec, rng, 5.0)
    d1, d2, du, dv, _ = _hex_cells(u, v, 32.0)
    e = _where(d1 < 8.0, np.float32(0.95) * _grain(grid, rng, 0.35), 0.45)
    e = _where(d2 - d1 < 1.5, 0.25, e)
    haze = _where((d1 >= 8.0) & (d1 < 14.0), 0.25, 0.06)
    density = _where((d1 > 10.0) & (d1 < 14.0), 14000, 0)
    return Layout(e, density, keep=d1 > 1.5, orient=_angle(spec, -dv, du), haze=haze)


def _colon(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Crypts (70 µm): round lumen, epithelium with goblet vacuoles and a ring of radially
    oriented nuclei, cellular lamina propria between crypts."""
    u, v = _frame(grid, spec, rng, 6.0)
    d1, _, du, dv, _ = _hex_cells(u, v, 70.0)
    epi = (d1 >= 9.0) & (d1 < 27.0)
    goblet = epi & (d1 < 20.0) & (_field(grid, rng, 1.0, 2.2) > 1.0)
    e = _where(epi, 0.6, 0.4) * _grain(grid, rng, 0.15)
    density = _where((d1 >= 21.0) & (d1 < 26.0), 16000, _where(d1 >= 29.0, 5000, 0))
    keep = (d1 >= 9.0) & ~goblet
    return Layout(e, density, keep=keep, orient=_angle(spec, du, dv), haze=0.06)


def _kidney(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Tubules (40 µm: small lumen, very eosinophilic cells, a ring of nuclei) with clefts
    between them, and glomeruli (80 µm tufts of dense nuclei in a white Bowman's space)."""
    u, v = _frame(grid, spec, rng, 8.0)
    d1, d2, _, _, _ = _hex_cells(u, v, 40.0)
    e = np.float32(0.85) * _grain(grid, rng, 0.2)
    density = _where((d1 > 8.0) & (d1 < 13.0), 16000, 0)
    keep = (d1 > 5.0) & (d2 - d1 > 1.0)
    g1, _, _, _, gid = _hex_cells(u + np.float32(37), v + np.float32(11), 260.0)
    glom = (_unit_random(gid, spec.seed % 997) < 0.6) & (g1 < 50.0)
    tuft = g1 < 40.0
    e = _where(glom, _where(tuft, np.float32(0.5) * _grain(grid, rng, 0.3), 0), e)
    density = _where(glom, _where(tuft, 18000, 0), density)
    keep = np.where(glom, tuft & (_field(grid, rng, 1.0, 1.5) < 1.0), keep)
    return Layout(e, density, keep=keep, haze=0.06)


def _breast(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Dense collagen with few spindle nuclei, ducts (two cell layers around a lumen) and fat
    (large empty cells with hair-thin walls)."""
    u, v = _frame(grid, spec, rng, 8.0)
    fat = _field(grid, rng, 8.0 * spec.tags.scale, 6.0) > 0.5
    a1, a2, _, _, _ = _hex_cells(u, v, 55.0)
    wall = a2 - a1 < 1.5
    d1, _, du, dv, uid = _hex_cells(u + np.float32(51), v, 150.0)
    duct = (_unit_random(uid, spec.seed % 991) < 0.7) & (d1 < 24.0) & ~fat
    e = _where(duct, 0.45, np.float32(0.75) * _collagen(grid, spec, rng, v, 0.6))
    density = _where(fat, _where(wall, 600, 0), 800)
    density = _where(duct, _where((d1 >= 8.0) & (d1 < 20.0), 16000, 0), density)
    radial = _where(d1 >= 15.0, _angle(spec, -dv, du), _angle(spec, du, dv))  # myoepithelium
    orient = _where(duct, radial, spec.tags.angle)
    keep = np.where(fat, wall, ~(duct & (d1 < 8.0)))
    return Layout(e, density, keep=keep, orient=orient, haze=0.05)


def _brain(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Neuropil: pale, finely fibrillary, no fibres; sparse glia, most in clear halos."""
    e = np.float32(0.42) * _grain(grid, rng, 0.3)
    return Layout(e, np.full(grid.shape, np.float32(2500)), haze=0.08, halo=0.7)


def _spleen(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """White pulp follicles (packed lymphocytes) in red pulp (red cells, fewer nuclei)."""
    follicle = _field(grid, rng, 10.0 * spec.tags.scale, 5.0) > 0.3
    rbc = _random_discs(grid, np.random.default_rng([spec.seed, STREAM_EXTRA]), 20000, (3.0, 3.4))
    e = _where(rbc & ~follicle, 1.1, _where(follicle, 0.25, 0.35))
    return Layout(e, _where(follicle, 15000, 3000), haze=0.07)


def _intestine(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Villi (110 µm period): fingers lined by a palisade of nuclei perpendicular to the bright
    brush border, loose core, white gaps between fingers."""
    u, v = _frame(grid, spec, rng, 10.0)
    f = _stripes(v, 110.0)
    depth = np.minimum(f - 0.25, 1 - f) * np.float32(110.0)  # µm below the villus surface
    e = _where(depth < 1.5, 1.0, _where(depth < 14.0, 0.55, 0.35)) * _grain(grid, rng, 0.15)
    density = _where(depth < 5.0, 0, _where(depth < 11.0, 18000, 4000))
    orient = np.full(grid.shape, np.float32(spec.tags.angle + np.pi / 2))
    return Layout(e, density, keep=f >= 0.25, orient=orient, haze=0.06)


def _heart(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Cardiac muscle: parallel 14 µm fibres with 2 µm cross-striations, central nuclei along
    the fibres, thin white gaps between fibres."""
    u, v = _frame(grid, spec, rng, 6.0)
    g = _stripes(v, 14.0)
    e = np.float32(0.8) * _grain(grid, rng, 0.1)
    density = _where((g > 0.45) & (g < 0.65), 10000, 0)
    orient = np.full(grid.shape, np.float32(spec.tags.angle))
    return Layout(e, density, keep=g > 0.1, orient=orient, haze=0.05, along=u)


def _bone(grid: Grid, spec: SlideSpec, rng) -> Layout:
    """Trabeculae (solid bright lamellar matrix, sparse nuclei) and marrow (packed nuclei,
    round fat vacuoles); some nuclei sit in clear lacunae."""
    n = _field(grid, rng, 6.0 * spec.tags.scale, 5.0)
    bone = n > 0.25
    e = _where(bone, np.float32(0.95) * (1 + np.float32(0.12) * np.sin(n * np.float32(25))), 0.35)
    vacuole = _random_discs(grid, np.random.default_rng([spec.seed, STREAM_EXTRA]), 1200, (8, 16))
    return Layout(e, _where(bone, 500, 9000), keep=~(vacuole & ~bone), haze=0.05, halo=0.15)


ORGAN_LAYOUTS: dict[str, Callable[[Grid, SlideSpec, np.random.Generator], Layout]] = {
    "bone": _bone, "brain": _brain, "breast": _breast, "colon": _colon, "heart": _heart,
    "intestine": _intestine, "kidney": _kidney, "liver": _liver, "lung": _lung,
    "pancreas": _pancreas, "skin": _skin, "spleen": _spleen,
}  # fmt: skip
PAINTERS = (paint.paint_tissue, paint_tags)


# ------------------------------------------------------------------------------ checking
COLOUR_FEATURES = slice(0, 6)  # column groups of ``patch_statistics``
NUCLEUS_FEATURES = slice(6, 15)
TEXTURE_FEATURES = slice(6, 24)  # nuclei + architecture, no colour
NUCLEUS_OD_RATIO = 2.0  # nuclei: smoothed summed optical density above 2x the background's
BACKGROUND_QUANTILE = 25  # background: this percentile of the tissue's summed optical density


def patch_statistics(patches: np.ndarray) -> np.ndarray:
    """Cheap colour and texture statistics of RGB patches (to check that the tags show).

    Colour (``COLOUR_FEATURES``, 6): mean R, G, B and optical-density chromaticity (each
    channel's share of the summed density) over tissue pixels.

    Texture (``TEXTURE_FEATURES``, 18), from the summed optical density only. First the nuclei
    (``NUCLEUS_FEATURES``, 9): blobs of smoothed density above ``NUCLEUS_OD_RATIO`` x the
    tissue's ``BACKGROUND_QUANTILE``; their share of the patch, blobs per 1000 px, log median
    area, log median and upper-quartile inscribed radius, median and upper-quartile aspect
    ratio, log median area / inscribed disc (elongation, robust to touching nuclei), relative
    sd of the density inside them (chromatin). Then the architecture: log energy in 5 octave
    bands (0.7-22 px), local orientation coherence at 3 and 12 px, the share of white.

    Args:
        patches: (n, H, W, 3) uint8.

    Returns:
        (n, 24) float64.
    """
    return np.stack([_one_patch(p) for p in patches])


def _one_patch(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    od = -np.log(np.maximum(x, 1) / 255)  # (H, W, 3)
    total = od.sum(-1)  # (H, W)
    tissue = total > 0.25
    t = tissue if tissue.sum() > 16 else np.ones_like(tissue)
    mean_od = od[t].mean(0)
    colour = [x[t].mean(0), mean_od / max(float(mean_od.sum()), 1e-6)]
    grey, bands = total - total.mean(), []
    for s in (0.7, 1.4, 2.8, 5.6, 11.2):
        low = ndimage.gaussian_filter(grey, s)
        bands.append(float(((grey - low) ** 2).mean()))
        grey = low
    background = float(np.percentile(total[t], BACKGROUND_QUANTILE))
    texture = [
        *_nucleus_statistics(total, background),
        *np.log(np.array(bands) + 1e-6),
        _coherence(total, 3.0),
        _coherence(total, 12.0),
        1 - tissue.mean(),
    ]
    return np.concatenate([*colour, texture])


def _nucleus_statistics(total: np.ndarray, background: float) -> list[float]:
    """The 9 ``NUCLEUS_FEATURES`` of a (H, W) summed optical density image."""
    nuc = ndimage.gaussian_filter(total, 1.0) > NUCLEUS_OD_RATIO * background
    labels, n = ndimage.label(nuc)
    idx = np.arange(1, n + 1)
    area = ndimage.sum_labels(nuc, labels, idx) if n else np.zeros(0)
    big = idx[area >= 6]  # label ids of blobs of >= 6 px
    if not len(big):
        return [float(nuc.mean()), 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    a, aspect = area[big - 1], _blob_aspect(labels, big)
    inscribed = ndimage.maximum(ndimage.distance_transform_edt(nuc), labels, big)  # (m,) px
    inside = total[nuc]
    return [
        float(nuc.mean()),
        len(big) / nuc.size * 1e3,
        float(np.log(np.median(a))),
        float(np.log(np.median(inscribed))),
        float(np.log(np.percentile(inscribed, 75))),
        float(np.median(aspect)),
        float(np.percentile(aspect, 75)),
        float(np.log(np.median(a / (np.pi * inscribed**2)))),
        float(inside.std() / inside.mean()),
    ]


def _blob_aspect(labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Aspect ratio (sqrt of the eigenvalue ratio of second moments) of labelled blobs."""
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    ones = np.ones(labels.shape)
    m = ndimage.sum_labels(ones, labels, idx)
    mx, my = ndimage.sum_labels(xx, labels, idx) / m, ndimage.sum_labels(yy, labels, idx) / m
    cxx = ndimage.sum_labels(xx * xx, labels, idx) / m - mx**2
    cyy = ndimage.sum_labels(yy * yy, labels, idx) / m - my**2
    cxy = ndimage.sum_labels(xx * yy, labels, idx) / m - mx * my
    tr, det = cxx + cyy, cxx * cyy - cxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    return np.sqrt((tr / 2 + disc + 0.1) / (tr / 2 - disc + 0.1))  # +0.1: pixel size


def _coherence(img: np.ndarray, sigma: float) -> float:
    """Mean local orientation coherence of the structure tensor (window `sigma` px), in
    [0, 1]: ~1 for stripes, ~0 for isotropic texture."""
    gy, gx = np.gradient(ndimage.gaussian_filter(img, 1.0))
    jxx, jyy, jxy = (ndimage.gaussian_filter(a, sigma) for a in (gx * gx, gy * gy, gx * gy))
    return float((np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-6)).mean())
