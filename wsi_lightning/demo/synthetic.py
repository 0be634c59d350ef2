"""Synthetic H&E whole-slide images with tumour lesions, for demos and tests.

A slide is described by a frozen ``SlideSpec`` (drawn by ``sample_spec``) and drawn by ``render``,
which runs a sequence of painters (``paint.py``) on a canvas of stain concentrations. Everything is
in microns, so the same spec renders the same tissue at any mpp, and everything is seeded, so the
same seed gives identical pixels.

What the demo data is designed to show:
    - Normal tissue: pink eosin stroma with wavy fibres, scattered small spindle-ish nuclei,
      round lumens; a few irregular tissue blobs cover 35-60% of the glass.
    - Nuisance, unrelated to the label: each slide has its own stain vectors and strengths,
      nuclear density and size, fibre texture and coverage, so slide-level averages of tile
      features vary a lot between slides.
    - Tumour slides: 1-4 lesions whose cells look clearly different (nuclei twice the radius,
      ~2-4x denser, darker, bluer, elongated and irregular), many of them small (25-60 µm radius,
      1-3 tiles of 112 px at 0.5 µm/px) so the lesion is a small fraction of the tissue (median
      ~1.7% of the tissue area, ~2.4% of 56-µm tissue tiles): attention MIL finds it, mean
      pooling mostly does not.

Task ``"multiscale"`` (``sample_spec(task=...)``, painters ``MULTISCALE_PAINTERS``): the label
needs two cues at the same place, each visible at one magnification only (CS-MIL-style data):
    - Architecture (needs ~100-200 µm of context): in its regions the nuclei line up in parallel
      cords of 3 rows, 60-70 µm apart, at the slide's mean density. A 56 µm window at 0.5 µm/px
      shows the usual nuclei; a 224 µm window at 2 µm/px shows the cords.
    - Atypia (needs 0.5 µm/px): vesicular nuclei (crenated, thick membrane, chromatin clumps,
      nucleolus) with the size, density and integrated stain of normal ones, in granular
      cytoplasm whose eosin alternates on 0.5 µm cells with an unchanged mean over every 1 µm.
      At 1-2 µm/px the region's colour and texture match normal tissue.
    - Every slide has 2 regions per cue (140-220 µm radius). On a tumour slide both cues share
      the same 2 regions (the lesions, annotated 'Tumor'); on a normal slide they lie in 4
      separate single-cue decoys (annotated 'Decoy-architecture' / 'Decoy-cells'). Cue counts
      do not depend on the label, so a model that sees one magnification is at chance;
      ``bench/check_multiscale_demo.py`` measures it. (Until task version 2 a tumour slide had
      one lesion and two decoys: too little signal for MIL on 44 training slides.)
    - Cue area and tissue do not depend on the label either: every slide places 4 regions the
      same way, and a tumour slide leaves the 2 that would be its atypia decoys empty (task
      version 3; in version 2 tumour slides placed only their 2 lesions, which then shrank
      less to fit, so they had ~30% more area of each cue than normal slides).
    - Nuclei are denser (3000-4500 /mm²) and tissue covers 20% more glass than in the lesion
      task; the nuisance variation is the same.

Task ``"multitag"`` (``multitag.py``: specs drawn by ``multitag.sample_spec``, painters
``multitag.PAINTERS``): stain, species and organ tags, shown by the slide's palette, its nuclei
and its tissue architecture.

Later additions are new spec fields + painters, in ``PAINTERS`` (no-ops for existing specs) or in
a new task's painter sequence.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy import ndimage

from wsi_lightning.demo import multitag, paint, zoom
from wsi_lightning.demo.specs import (
    MULTISCALE_ARCHITECTURE,
    MULTISCALE_ATYPIA,
    ZOOM_ARCHITECTURE,
    ZOOM_ATYPIA,
    ArchitectureSpec,
    AtypiaSpec,
    Lesion,
    NucleiSpec,
    Palette,
    SlideSpec,
    StromaSpec,
    TissueSpec,
)

__all__ = [
    "DECOY_CLASSES",
    "MULTISCALE_PAINTERS",
    "PAINTERS",
    "TASKS",
    "TASK_PAINTERS",
    "ArchitectureSpec",
    "AtypiaSpec",
    "Lesion",
    "NucleiSpec",
    "Palette",
    "SlideSpec",
    "StromaSpec",
    "TissueSpec",
    "decoy_outlines",
    "render",
    "sample_multiscale_regions",
    "sample_spec",
]


PAINTERS = (
    paint.paint_tissue,
    paint.paint_lesion_regions,
    paint.paint_stroma,
    paint.paint_nuclei,
    paint.paint_tumour_nuclei,
)
MULTISCALE_PAINTERS = (
    paint.paint_tissue,
    paint.paint_cue_regions,
    paint.paint_stroma,
    paint.paint_granular_cytoplasm,
    paint.paint_cue_nuclei,
)
TASK_PAINTERS = {
    "lesion": PAINTERS,
    "multiscale": MULTISCALE_PAINTERS,
    "multitag": multitag.PAINTERS,
    "zoom": zoom.PAINTERS,
}
TASKS = tuple(TASK_PAINTERS)
# annotated regions that are not lesions: spec field -> GeoJSON class
DECOY_CLASSES = {
    "arch_decoys": "Decoy-architecture",
    "cell_decoys": "Decoy-cells",
    "candidates": "Candidate",
}


def render(spec: SlideSpec, painters=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a slide.

    Args:
        spec: the slide.
        painters: painter sequence; default ``TASK_PAINTERS[spec.task]``.

    Returns:
        ((H, W, 3) uint8 RGB at ``spec.mpp``, one (K, 2) float (x, y) level-0-pixel outline per
        lesion).
    """
    if painters is None:
        painters = TASK_PAINTERS[spec.task]
    width, height = spec.size_px
    canvas = paint.Canvas.empty(height, width, spec.mpp)
    for painter in painters:
        painter(canvas, spec)
    image = paint.compose(canvas, spec.palette)
    return image, [les.outline_um() / spec.mpp for les in spec.lesions]


def decoy_outlines(spec: SlideSpec) -> dict[str, list[np.ndarray]]:
    """Multiscale and zoom tasks: (K, 2) level-0-pixel outlines of the decoys / candidates by
    class name (``DECOY_CLASSES``); empty lists for the lesion task."""
    return {
        name: [d.outline_um() / spec.mpp for d in getattr(spec, field)]
        for field, name in DECOY_CLASSES.items()
    }


def _jitter(rng: np.random.Generator, v: tuple[float, ...], rel: float) -> tuple[float, ...]:
    return tuple(float(x * rng.uniform(1 - rel, 1 + rel)) for x in v)


def sample_spec(
    rng: np.random.Generator,
    label: str,
    slide_id: str = "slide",
    size_um: float = 1536.0,
    mpp: float = 0.5,
    max_lesions: int = 4,
    task: str = "lesion",
) -> SlideSpec:
    """Draw a random slide: nuisance variation for every slide, lesions for ``"tumor"``.

    Args:
        rng: source of randomness (the spec is a pure function of its state).
        label: ``"normal"`` or ``"tumor"``.
        slide_id: name stored in the spec.
        size_um: slide side in microns (square).
        mpp: level-0 microns per pixel to render at.
        max_lesions: most lesions on a tumour slide (``"multiscale"``: most regions per cue,
            at most 2).
        task: ``"lesion"`` (lesions of clearly different cells), ``"multiscale"`` (lesions
            need two cues at two magnifications; see ``sample_multiscale_regions``) or
            ``"zoom"`` (candidate regions seen at low magnification, the cue inside some of
            them at high; see ``sample_zoom_regions``).
    """
    if label not in ("normal", "tumor"):
        raise ValueError(f"label must be 'normal' or 'tumor', got {label!r}")
    if task not in TASKS or task == "multitag":
        raise ValueError(
            f"task must be 'lesion', 'multiscale' or 'zoom', got {task!r} "
            "(multitag: multitag.sample_spec)"
        )
    u = rng.uniform
    palette = Palette(
        hematoxylin=_jitter(rng, Palette.hematoxylin, 0.12),
        eosin=_jitter(rng, Palette.eosin, 0.12),
        h_strength=u(0.8, 1.2),
        e_strength=u(0.75, 1.25),
        background=_jitter(rng, Palette.background, 0.5),
    )
    blobs = tuple(
        (
            u(0.3, 0.7) * size_um,
            u(0.3, 0.7) * size_um,
            u(0.12, 0.28) * size_um,
            u(0.12, 0.28) * size_um,
            u(0, np.pi),
        )
        for _ in range(int(rng.integers(2, 5)))
    )
    tissue = TissueSpec(blobs, u(0.35, 0.6), u(0.15, 0.35), u(5, 25), u(10, 30))
    stroma = StromaSpec(u(0.45, 0.7), u(6, 14), u(0, np.pi), u(0.2, 0.6), u(3, 8), u(0.03, 0.1))
    radius = u(2.8, 3.8)
    nuclei = NucleiSpec(u(1500, 4000), radius, 0.15, u(1.2, 2.0), u(0.02, 0.08), u(0.8, 1.1), 0.3)
    tumour = NucleiSpec(
        u(6000, 8000), 2 * radius, 0.25, u(1.4, 1.9), u(0.15, 0.25), u(1.4, 1.7), 0.5
    )
    spec = SlideSpec(
        slide_id,
        int(rng.integers(2**31)),
        label,
        size_um,
        size_um,
        mpp,
        palette,
        tissue,
        stroma,
        nuclei,
        tumour,
    )
    if task == "multiscale":
        return sample_multiscale_regions(rng, spec, per_cue=min(max_lesions, 2))
    if task == "zoom":
        return sample_zoom_regions(rng, spec)
    if label == "tumor":
        n = int(rng.choice(np.arange(1, max_lesions + 1), p=_lesion_count_p(max_lesions)))
        spec = replace(spec, lesions=_place_lesions(rng, spec, n))
    return spec


def sample_multiscale_regions(
    rng: np.random.Generator, spec: SlideSpec, per_cue: int = 2
) -> SlideSpec:
    """Turn a drawn slide into one of the multiscale task: denser nuclei, more tissue, and cue
    regions.

    Every slide has `per_cue` regions with the architecture cue and `per_cue` with the atypia
    cue, whatever its label. On a tumour slide they coincide: `per_cue` regions have both (the
    lesions); on a normal slide all 2 x `per_cue` regions are single-cue decoys. So a model that
    sees one cue (one magnification) finds the same number of cue regions in both classes and
    cannot tell them apart; only the co-location of both cues, which needs both magnifications,
    can. Every slide places the same 2 x `per_cue` regions (``_region_radius``, 40 µm apart,
    shrunk where they do not fit), so the area of each cue has the same distribution in both
    classes (on a given seed the architecture regions are identical); on a tumour slide the
    atypia regions are placed but left empty.
    """
    spec = replace(
        spec,
        task="multiscale",
        tissue=replace(spec.tissue, coverage=spec.tissue.coverage + 0.2),  # room for the regions
        # denser than the lesion task's, so that cords at the same density are close together
        nuclei=replace(spec.nuclei, density_per_mm2=float(rng.uniform(3000, 4500))),
        architecture=MULTISCALE_ARCHITECTURE,
        atypia=MULTISCALE_ATYPIA,
    )
    # Every slide places 2 x per_cue regions and assigns them in random order to the two cues,
    # whatever its label; a tumour slide then puts the atypia into its architecture regions
    # (they become the lesions) and leaves its atypia regions out. Placing fewer regions on
    # tumour slides (task version 2) shrank them less: tumour slides had ~30% more area of each
    # cue than normal ones, a label leak visible at one magnification.
    kinds = np.repeat([1, 2], per_cue)[rng.permutation(2 * per_cue)]  # 1 arch, 2 cells
    regions = _place_lesions(
        rng, spec, len(kinds), radius=_region_radius, gap_um=40.0, min_radius_um=25.0
    )
    if len(regions) < len(kinds):
        raise RuntimeError(
            f"slide {spec.slide_id}: no room for {len(kinds)} cue regions; use a larger size_um"
        )
    arch, cells = (tuple(r for r, k in zip(regions, kinds, strict=True) if k == j) for j in (1, 2))
    if spec.label == "tumor":
        return replace(spec, lesions=arch)
    return replace(spec, arch_decoys=arch, cell_decoys=cells)


def sample_zoom_regions(
    rng: np.random.Generator, spec: SlideSpec, z: zoom.ZoomSpec = zoom.ZOOM
) -> SlideSpec:
    """Turn a drawn slide into one of the zoom task (``zoom.py``): `z.n_candidates` candidate
    regions on every slide, of which `z.lesions` (a range) carry the cue on a tumour slide.

    The regions' sizes do not depend on the label (drawn before it is looked at, placed in
    random order, 60 µm apart), so candidate area and count are no shortcut.
    """
    spec = replace(spec, task="zoom", zoom=z, atypia=ZOOM_ATYPIA, architecture=ZOOM_ARCHITECTURE)
    lo, hi = (math.log(r) for r in z.radius_um)

    def radius(rng: np.random.Generator, cap_um: float) -> float:
        return float(min(math.exp(rng.uniform(lo, hi)), cap_um))

    regions = _place_lesions(rng, spec, z.n_candidates, radius=radius, gap_um=60.0,
                             min_radius_um=40.0)
    if len(regions) < z.n_candidates:
        raise RuntimeError(
            f"slide {spec.slide_id}: no room for {z.n_candidates} candidate regions; use a "
            "larger size_um"
        )
    n_cue = int(rng.integers(z.lesions[0], z.lesions[1] + 1))  # drawn for every slide: same stream
    cue = rng.permutation(len(regions))[: n_cue if spec.label == "tumor" else 0]
    return replace(
        spec,
        lesions=tuple(r for i, r in enumerate(regions) if i in cue),
        candidates=tuple(r for i, r in enumerate(regions) if i not in cue),
    )


def _region_radius(rng: np.random.Generator, cap_um: float) -> float:
    """Multiscale cue regions: 140-220 µm radius (log-uniform; less where they do not fit), so
    that their architecture fills most of the 224 µm window of the tiles inside them."""
    return float(min(math.exp(rng.uniform(math.log(140), math.log(220))), cap_um))


def _lesion_count_p(max_lesions: int) -> np.ndarray:
    p = 0.7 ** np.arange(max_lesions)
    return p / p.sum()


def _lesion_radius(rng: np.random.Generator, cap_um: float) -> float:
    """Mostly small lesions (25-60 µm), sometimes larger (60-300 µm, log-uniform)."""
    if rng.uniform() < 0.8:
        r = rng.uniform(25, 60)
    else:
        r = math.exp(rng.uniform(math.log(60), math.log(300)))
    return float(min(r, cap_um))


def _place_lesions(
    rng: np.random.Generator,
    spec: SlideSpec,
    n: int,
    radius=_lesion_radius,
    gap_um: float = paint.CELL_UM,
    min_radius_um: float = 15.0,
) -> tuple[Lesion, ...]:
    """Lesions well inside tissue (2 cells of margin), not overlapping each other.

    Args:
        radius: ``radius(rng, cap_um) -> float``, the nominal radius of one lesion.
        gap_um: least distance between two lesions' outer reaches.
        min_radius_um: a lesion that does not fit shrinks by 20% steps down to this radius.
    """
    tissue = paint.lowres_tissue(spec)
    dist = ndimage.distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1] * paint.CELL_UM
    cells = np.argwhere(tissue)
    lesions: list[Lesion] = []
    for _ in range(n):
        radius_um = radius(rng, 0.2 * min(spec.width_um, spec.height_um))
        harmonics = tuple(
            (float(rng.uniform(0, 0.2 / k)), float(rng.uniform(0, 2 * np.pi))) for k in range(2, 6)
        )
        lesion = Lesion(
            (0.0, 0.0),
            radius_um,
            float(rng.uniform(1, 1.6)),
            float(rng.uniform(0, np.pi)),
            harmonics,
        )
        while True:
            reach = lesion.max_radius_um
            ok = dist[cells[:, 0], cells[:, 1]] >= reach + 2 * paint.CELL_UM
            centres = (cells[:, ::-1] + 0.5) * paint.CELL_UM  # (x, y) microns
            for other in lesions:
                gap = np.hypot(*(centres - other.center_um).T)
                ok &= gap >= reach + other.max_radius_um + gap_um
            if ok.any() or lesion.radius_um < min_radius_um:
                break
            lesion = replace(lesion, radius_um=lesion.radius_um * 0.8)
        if not ok.any():
            continue
        cx, cy = centres[rng.choice(np.flatnonzero(ok))]
        lesions.append(replace(lesion, center_um=(float(cx), float(cy))))
    if not lesions:
        raise RuntimeError(f"slide {spec.slide_id}: no room for a lesion; use a larger size_um")
    return tuple(lesions)
