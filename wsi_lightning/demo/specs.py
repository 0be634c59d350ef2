"""The frozen dataclasses that describe a synthetic slide (drawn by ``synthetic.sample_spec``,
rendered by ``synthetic.render``), and the multiscale / zoom tasks' cue settings.

The bottom of the ``demo`` package: the painters (``paint``, ``multitag``, ``zoom``) and the
renderer import these; they import nothing of the package at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wsi_lightning.demo import multitag, zoom


@dataclass(frozen=True)
class Palette:
    """Stain optical densities per unit concentration (R, G, B), as in Beer-Lambert colour
    deconvolution, plus the glass background OD."""

    hematoxylin: tuple[float, float, float] = (0.65, 0.70, 0.29)
    eosin: tuple[float, float, float] = (0.08, 0.95, 0.28)
    h_strength: float = 1.0
    e_strength: float = 1.0
    background: tuple[float, float, float] = (0.03, 0.035, 0.03)


@dataclass(frozen=True)
class NucleiSpec:
    """A population of nuclei (sizes in microns)."""

    density_per_mm2: float
    radius_um: float
    radius_jitter: float  # relative sd of the radius
    elongation: float  # mean aspect ratio (1 = round)
    irregularity: float  # amplitude of the outline's 2nd/3rd harmonics
    stain: float  # hematoxylin concentration
    chromatin: float  # speckle amplitude in [0, 1]


@dataclass(frozen=True)
class StromaSpec:
    """Eosin stroma texture."""

    eosin: float  # eosin concentration
    fibre_um: float  # fibre wavelength
    fibre_angle: float  # radians
    fibre_contrast: float  # in [0, 1]
    waviness: float  # phase warp amplitude (radians)
    haze: float  # background hematoxylin in tissue


@dataclass(frozen=True)
class TissueSpec:
    """Tissue blobs (cx, cy, rx, ry, angle) in microns, thresholded to `coverage` of the glass."""

    blobs: tuple[tuple[float, float, float, float, float], ...]
    coverage: float
    roughness: float  # weight of the noise that makes outlines irregular
    lumen_per_mm2: float
    lumen_radius_um: float


@dataclass(frozen=True)
class Lesion:
    """A tumour region: a perturbed ellipse (microns)."""

    center_um: tuple[float, float]
    radius_um: float
    aspect: float
    angle: float
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of harmonics 2, 3, ...

    def outline_um(self, n: int = 64) -> np.ndarray:
        """Closed outline without the repeated first point. Returns (n, 2) (x, y) microns."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = np.full(n, self.radius_um)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            r = r + self.radius_um * amp * np.cos(k * t + phase)
        s = math.sqrt(self.aspect)
        x, y = r * np.cos(t) * s, r * np.sin(t) / s
        c, si = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.center_um[0] + c * x - si * y, self.center_um[1] + si * x + c * y], 1)

    @property
    def max_radius_um(self) -> float:
        extra = sum(a for a, _ in self.harmonics)
        return self.radius_um * (1 + extra) * math.sqrt(self.aspect)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Multiscale task: abnormal architecture = trabeculae: nuclei lined up in parallel cords of
    `cord_rows` staggered rows, at the slide's usual mean nuclear density (so the cords are
    tens of microns apart, with nucleus-poor stroma between them)."""

    cord_rows: int  # rows of nuclei per cord
    row_um: float  # spacing between the rows of a cord
    cord_gap_um: tuple[float, float]  # range of the spacing between cords (per region)
    cord_wave_um: tuple[float, float]  # range of the cords' undulation wavelength
    cord_wave_amp: float  # undulation amplitude, relative to the spacing between cords


@dataclass(frozen=True)
class AtypiaSpec:
    """Multiscale task: atypical cells = vesicular nuclei (crenated outline, thick membrane,
    clumped chromatin and a nucleolus on a pale nucleoplasm, with the size, density and
    integrated hematoxylin of the slide's normal nuclei) in granular cytoplasm (eosin that
    alternates on 0.5 µm cells, with the same mean over every 1 µm)."""

    crenation: float  # amplitude of outline harmonics 5-7 (relative radius)
    rim: float  # weight of the membrane in the texture
    clumps: int  # chromatin clumps per nucleus
    clump_um: float  # clump sd
    nucleolus_um: float  # nucleolus sd
    nucleolus_weight: float  # nucleolus peak relative to a clump
    contrast: float  # in [0, 1]: share of the stain in the texture (rest uniform)
    stain: float  # factor on the stain, for equal mean colour at low magnification
    granularity: float  # relative eosin granularity of the cytoplasm (0: none)
    size: float = 1.0  # radius factor (the integrated stain stays that of a normal nucleus)


MULTISCALE_ARCHITECTURE = ArchitectureSpec(
    cord_rows=3,
    row_um=12.0,
    cord_gap_um=(60.0, 70.0),
    cord_wave_um=(150.0, 300.0),
    cord_wave_amp=0.08,
)
MULTISCALE_ATYPIA = AtypiaSpec(
    crenation=0.06,
    rim=1.5,
    clumps=5,
    clump_um=0.5,
    nucleolus_um=0.6,
    nucleolus_weight=3.0,
    contrast=0.8,
    stain=1.05,
    granularity=0.4,
)
ZOOM_ATYPIA = replace(MULTISCALE_ATYPIA, size=1.3)  # zoom.py: the lesions' nuclei
# zoom.py: ... lined up in cords fine enough (2 rows, 30-40 µm apart) to vanish on a thumbnail
ZOOM_ARCHITECTURE = replace(MULTISCALE_ARCHITECTURE, cord_rows=2, row_um=10.0, cord_gap_um=(30.0, 40.0))


@dataclass(frozen=True)
class SlideSpec:
    """Everything needed to render one slide.

    Task ``"lesion"`` uses ``lesions`` + ``tumour_nuclei``; task ``"multiscale"`` uses
    ``lesions`` (both cues), ``arch_decoys``, ``cell_decoys``, ``architecture`` and ``atypia``;
    task ``"multitag"`` uses ``tags`` (``label`` is the organ); task ``"zoom"`` uses ``lesions``
    (candidates with the cue), ``candidates`` (without), ``zoom``, ``atypia`` and ``architecture``.
    """

    slide_id: str
    seed: int
    label: str  # "normal" | "tumor"
    width_um: float
    height_um: float
    mpp: float
    palette: Palette
    tissue: TissueSpec
    stroma: StromaSpec
    nuclei: NucleiSpec
    tumour_nuclei: NucleiSpec
    lesions: tuple[Lesion, ...] = ()
    task: str = "lesion"  # "lesion" | "multiscale" | "multitag" | "zoom"
    arch_decoys: tuple[Lesion, ...] = ()  # multiscale: abnormal architecture, normal nuclei
    cell_decoys: tuple[Lesion, ...] = ()  # multiscale: atypical nuclei, normal architecture
    architecture: ArchitectureSpec | None = None
    atypia: AtypiaSpec | None = None
    tags: multitag.TagSpec | None = None  # multitag: stain, species, organ
    candidates: tuple[Lesion, ...] = ()  # zoom: candidate regions without the cue
    zoom: zoom.ZoomSpec | None = None

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) in level-0 pixels."""
        return round(self.width_um / self.mpp), round(self.height_um / self.mpp)
