"""Realistic-size synthetic slides (100,000 x 80,000 px at 0.25 µm/px by default) for benchmarks.

A slide this size is 24 GB of RGB pixels, so it is never held: every pyramid level is drawn and
JPEG-encoded tile by tile (``tifffile.TiffWriter.write`` over an iterator of tiles) into an
SVS-like pyramid (the ``slides.pyramid`` recipe: Aperio description with the mpp, one top-level
page per level), which the fast reader and OpenSlide both read. Memory stays at the texture
atlases and one tile, whatever the slide size (``peak_rss_mb`` in the stats says how much).

What is drawn, everything in level-0 microns so that each level shows the same slide:
    - A few (default 4) irregular tissue pieces, ellipses on a jittered grid whose outlines are
      perturbed by two octaves of smooth lattice noise (300 and 1200 µm), covering ~30% of the
      glass; sharp, anti-aliased edges.
    - Texture from two periodic atlases (256 µm at 0.25 µm/px): cellular tissue (dense round
      nuclei in pink cytoplasm) and paler stroma (sparse spindle nuclei, wavy fibres), stained by
      Beer-Lambert with the Ruifrok H&E vectors, blended by a smooth 800-µm noise field and
      scaled by a 1.5-mm stain-intensity field.
    - Each level's atlas is the level-0 atlas box-averaged by the level's downsample, and the
      smooth fields enter linearly, so a coarse level is (to within the smooth fields' variation
      inside a pixel) the box average of the level below it, as a scanner's pyramid is.
    - Glass tiles (no tissue within the tile) are one flat colour.

Not drawn: lumens, fat, folds, pen marks, blur; this is a throughput and memory workload, and a
tissue-segmentation check only in that its pieces are known.

    python -m wsi_lightning.demo.gigapixel OUT.tiff [--width 100000 --height 80000 --mpp 0.25]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from rich.progress import Progress
from scipy import ndimage

from wsi_lightning.slides.pyramid import aperio_description

log = logging.getLogger(__name__)

GLASS = np.array([242.0, 242.0, 240.0], np.float32)
STAIN_H = np.array([0.65, 0.70, 0.29], np.float32)  # Ruifrok & Johnston optical densities
STAIN_E = np.array([0.07, 0.99, 0.11], np.float32)
ATLAS_PX = 1024  # atlas period in level-0 pixels (a multiple of every downsample drawn)
NODES = 16  # smooth fields are evaluated every NODES px of a tile and interpolated bilinearly


@dataclass(frozen=True)
class GigaSpec:
    """What a gigapixel slide is drawn from (equal specs give identical files).

    Attributes:
        width, height: level-0 size in pixels.
        mpp: level-0 microns per pixel.
        tile: TIFF tile side in pixels (a multiple of 16).
        quality: JPEG quality.
        pieces: number of tissue pieces (on a jittered grid of about square cells).
        seed: random seed of the pieces, fields and atlases.
        min_level_px: levels are added while the next one's shorter side is >= this.
        version: bumped when the drawing changes (cached slides are redrawn).
    """

    width: int = 100_000
    height: int = 80_000
    mpp: float = 0.25
    tile: int = 256
    quality: int = 80
    pieces: int = 4
    seed: int = 0
    min_level_px: int = 256
    version: int = 1

    def __post_init__(self) -> None:
        if self.width < self.tile or self.height < self.tile or self.tile % 16:
            raise ValueError(f"GigaSpec: width and height must be >= tile and tile a multiple of 16; got {self}")
        if not self.mpp > 0 or self.pieces < 1:
            raise ValueError(f"GigaSpec: mpp must be > 0 and pieces >= 1; got {self}")

    def level_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each level, halving (rounded up) while the shorter side allows."""
        sizes = [(self.width, self.height)]
        while min(sizes[-1]) // 2 >= self.min_level_px and len(sizes) < 11:
            w, h = sizes[-1]
            sizes.append((math.ceil(w / 2), math.ceil(h / 2)))
        return sizes


# ----------------------------------------------------------------------------- smooth fields
class _Fields:
    """The slide's low-frequency fields, at any level-0 micron positions.

    ``tissue``: a signed distance in µm (> 0 inside a piece); ``blend``: 0 cellular .. 1 stroma;
    ``intensity``: stain strength around 1.
    """

    def __init__(self, spec: GigaSpec) -> None:
        rng = np.random.default_rng([spec.seed, 1])
        self.w_um, self.h_um = spec.width * spec.mpp, spec.height * spec.mpp
        shape = lambda cell: (math.ceil(self.h_um / cell) + 4, math.ceil(self.w_um / cell) + 4)  # noqa: E731
        self.lattices = {cell: ndimage.spline_filter(rng.standard_normal(shape(cell)), order=3, mode="nearest")
                         for cell in (300.0, 800.0, 1200.0, 1500.0)}  # cubic-spline coefficients, once
        cols = max(1, round(math.sqrt(spec.pieces * self.w_um / self.h_um)))
        rows = math.ceil(spec.pieces / cols)
        cw, ch = self.w_um / cols, self.h_um / rows
        self.pieces = []  # (cx, cy, rx, ry, angle) in µm
        for i in range(spec.pieces):
            cx, cy = (i % cols + 0.5 + rng.uniform(-0.12, 0.12)) * cw, (i // cols + 0.5 + rng.uniform(-0.12, 0.12)) * ch
            self.pieces.append((cx, cy, cw * rng.uniform(0.28, 0.38), ch * rng.uniform(0.28, 0.38),
                                rng.uniform(0, math.pi)))

    def _noise(self, cell: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Smooth unit-variance-ish noise with features of ``cell`` µm (cubic lattice)."""
        return ndimage.map_coordinates(self.lattices[cell], [y / cell + 1, x / cell + 1], order=3,
                                       mode="nearest", prefilter=False).astype(np.float32)

    def sample(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fields at points ``x``, ``y`` (any shape, level-0 µm): (tissue µm, blend, intensity)."""
        wobble = 0.12 * self._noise(300.0, x, y) + 0.2 * self._noise(1200.0, x, y)
        tissue = np.full(x.shape, -np.inf, np.float32)
        for cx, cy, rx, ry, angle in self.pieces:
            u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
            v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
            rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
            tissue = np.maximum(tissue, (1 + wobble - rho) * math.sqrt(rx * ry))
        blend = np.clip(0.5 + 0.9 * self._noise(800.0, x, y), 0, 1)
        intensity = 1 + 0.15 * np.clip(self._noise(1500.0, x, y), -2, 2)
        return tissue, blend, intensity


# ----------------------------------------------------------------------------- texture atlases
def _stamp_nuclei(h: np.ndarray, rng: np.random.Generator, n: int, radius_px: tuple[float, float],
                  elongation: tuple[float, float], od: float) -> None:
    """Add ``n`` soft-edged elliptic nuclei of haematoxylin ``od`` to the periodic ``h``."""
    p = h.shape[0]
    for _ in range(n):
        r = rng.uniform(*radius_px)
        a, b = r * rng.uniform(*elongation), r
        t = rng.uniform(0, math.pi)
        half = math.ceil(max(a, b)) + 2
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        stamp = np.clip((1 - rho) * b + 0.5, 0, 1) * od * rng.uniform(0.7, 1.2)
        cy, cx = rng.integers(0, p, 2)
        iy, ix = np.arange(cy - half, cy + half + 1) % p, np.arange(cx - half, cx + half + 1) % p
        h[np.ix_(iy, ix)] = np.maximum(h[np.ix_(iy, ix)], stamp)


def _atlas(rng: np.random.Generator, mpp: float, kind: str) -> np.ndarray:
    """One periodic (ATLAS_PX, ATLAS_PX, 3) float32 atlas of ``GLASS - rgb`` (stain absorbance)."""
    p, um = ATLAS_PX, 1.0 / mpp  # pixels per micron
    area_mm2 = (p * mpp / 1000) ** 2
    noise = rng.standard_normal((2, p, p)).astype(np.float32)
    if kind == "cellular":
        fibres = ndimage.gaussian_filter(noise[0], (2 * um, 2 * um), mode="wrap")
        h = np.full((p, p), 0.12, np.float32)
        _stamp_nuclei(h, rng, round(6000 * area_mm2), (3.0 * um, 4.5 * um), (1.0, 1.4), 0.95)
        e = 0.42 + 0.15 * fibres / (fibres.std() + 1e-6)
    else:
        fibres = ndimage.gaussian_filter(noise[0], (0.7 * um, 6 * um), mode="wrap")
        h = np.full((p, p), 0.05, np.float32)
        _stamp_nuclei(h, rng, round(1500 * area_mm2), (1.2 * um, 1.8 * um), (2.5, 4.0), 0.8)
        e = 0.22 + 0.12 * fibres / (fibres.std() + 1e-6)
    grain = ndimage.gaussian_filter(noise[1], 0.6 * um, mode="wrap")
    e = np.clip(e + 0.04 * grain / (grain.std() + 1e-6), 0, None)
    od = h[..., None] * STAIN_H + e[..., None] * STAIN_E  # (P, P, 3)
    return (GLASS - 255 * np.power(10, -od)).astype(np.float32)


def _atlases(spec: GigaSpec, n_levels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cellular, stroma - cellular) atlases of each level, tiled to at least one tile: the
    level-0 atlas box-averaged by 2**level (so a tile is a slice, never a gather)."""
    rng = np.random.default_rng([spec.seed, 2])
    cell = _atlas(rng, spec.mpp, "cellular")
    base = (cell, _atlas(rng, spec.mpp, "stroma") - cell)
    out = []
    for level in range(n_levels):
        f = min(2**level, ATLAS_PX)
        small = [a.reshape(ATLAS_PX // f, f, ATLAS_PX // f, f, 3).mean((1, 3)) for a in base]
        reps = math.ceil(spec.tile / small[0].shape[0])  # coarse levels: repeat up to a tile
        out.append(tuple(np.tile(a, (reps, reps, 1)) for a in small))
    return out


# ----------------------------------------------------------------------------- tiles
def _interp_matrix(size: int) -> np.ndarray:
    """(size, size // NODES + 1) bilinear weights from nodes every NODES px to each pixel."""
    n = size // NODES + 1
    pos = np.arange(size, dtype=np.float32) / NODES
    i0 = np.minimum(pos.astype(np.int64), n - 2)
    frac = pos - i0
    m = np.zeros((size, n), np.float32)
    m[np.arange(size), i0] = 1 - frac
    m[np.arange(size), i0 + 1] = frac
    return m


def _level_tiles(spec: GigaSpec, level: int, size: tuple[int, int], fields: _Fields,
                 atlas: tuple[np.ndarray, np.ndarray], counts: dict, advance) -> Iterator[np.ndarray]:
    """Every tile of one level, row-major, as (tile, tile, 3) uint8."""
    t, ds = spec.tile, 2**level
    px_um = spec.mpp * ds
    lw, lh = size
    interp = _interp_matrix(t)  # (t, nodes)
    nodes = np.arange(0, t + 1, NODES, dtype=np.float32)  # node offsets in level px
    glass = np.ascontiguousarray(np.broadcast_to(GLASS.astype(np.uint8), (t, t, 3)))
    cell, diff = atlas  # (period, period, 3), period a multiple of t
    period = cell.shape[0]
    buf = np.empty((t, t, 3), np.float32)
    for ty in range(math.ceil(lh / t)):
        for tx in range(math.ceil(lw / t)):
            ny, nx = np.meshgrid((ty * t + nodes) * px_um, (tx * t + nodes) * px_um, indexing="ij")
            tissue, blend, intensity = fields.sample(nx, ny)  # each (nodes, nodes)
            advance()
            if tissue.max() < -px_um:
                yield glass
                continue
            counts[level] = counts.get(level, 0) + 1
            up = lambda f: interp @ f @ interp.T  # noqa: E731 - (nodes, nodes) -> (t, t)
            cover = np.clip(up(tissue) / px_um + 0.5, 0, 1) * up(intensity)  # (t, t)
            y0, x0 = ty * t % period, tx * t % period
            window = (slice(y0, y0 + t), slice(x0, x0 + t))
            np.multiply(diff[window], up(blend)[..., None], out=buf)  # (t, t, 3): cellular..stroma
            buf += cell[window]
            buf *= cover[..., None]
            np.subtract(GLASS + 0.5, buf, out=buf)  # + 0.5: rounded by the cast
            np.clip(buf, 0, 255, out=buf)
            yield buf.astype(np.uint8)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB: Linux's ``VmHWM``, the high-water mark
    of this program's own memory. (``ru_maxrss`` is not: it keeps the high-water mark of the
    process before ``exec``, so a child started by a 750 MB parent reports >= 750 MB.)
    Elsewhere ``ru_maxrss`` (KB on Linux-likes, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def write_gigapixel(path: str | os.PathLike, spec: GigaSpec = GigaSpec(), progress: bool = True) -> dict:
    """Draw and write the slide of ``spec`` to ``path`` atomically, tile by tile.

    Returns:
        stats: ``seconds``, ``levels`` (sizes), ``tiles`` and ``tissue_tiles`` per level
        (tiles with any tissue), ``bytes``, ``peak_rss_mb`` (of this process, so far).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = spec.level_sizes()
    fields, atlases = _Fields(spec), _atlases(spec, len(sizes))
    counts: dict[int, int] = {}
    n_tiles = [math.ceil(w / spec.tile) * math.ceil(h / spec.tile) for w, h in sizes]
    app_mag = round(10.0 / spec.mpp, 2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with Progress(disable=not progress, transient=True) as bar, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            task = bar.add_task(f"drawing {spec.width}x{spec.height} px slide", total=sum(n_tiles))
            for level, (lw, lh) in enumerate(sizes):
                level_mpp = spec.mpp * spec.width / lw
                tiles = _level_tiles(spec, level, (lw, lh), fields, atlases[level], counts,
                                     lambda: bar.advance(task))
                tw.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(spec.tile, spec.tile),
                         photometric="rgb", compression="jpeg", compressionargs={"level": spec.quality},
                         resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER",
                         subfiletype=0 if level == 0 else 1, metadata=None, maxworkers=1,
                         description=aperio_description(spec.width, spec.height, (lw, lh) if level else None,
                                                        spec.tile, spec.quality, spec.mpp, app_mag))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"seconds": round(time.perf_counter() - t0, 1), "levels": [list(z) for z in sizes], "tiles": n_tiles,
            "tissue_tiles": [counts.get(i, 0) for i in range(len(sizes))], "bytes": path.stat().st_size,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def gigapixel_slide(folder: str | os.PathLike, spec: GigaSpec = GigaSpec(), progress: bool = True) -> tuple[Path, dict]:
    """The slide of ``spec`` in ``folder``, written once: a stamp beside it records the spec and
    the stats of the run that wrote it, and a slide whose stamp differs is redrawn.

    Returns:
        (path, stats of the run that wrote it).
    """
    folder = Path(folder)
    name = f"giga_{spec.width}x{spec.height}_s{spec.seed}"
    path, stamp = folder / f"{name}.tiff", folder / f"{name}.json"
    if path.exists() and stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("spec") == asdict(spec):
            return path, saved["stats"]
    log.info("drawing %s (once; cached as %s)", name, path)
    stats = write_gigapixel(path, spec, progress=progress)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"spec": asdict(spec), "stats": stats}, indent=2))
    os.replace(tmp, stamp)
    return path, stats


def main(argv: list[str] | None = None) -> None:
    """CLI: write one slide and print its stats as JSON (the benchmark runs it in a fresh process
    so that ``peak_rss_mb`` is the generator's own)."""
    p = argparse.ArgumentParser(prog="python -m wsi_lightning.demo.gigapixel", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="where the slide (and its stamp) is written")
    for key in ("width", "height", "tile", "quality", "pieces", "seed"):
        p.add_argument(f"--{key}", type=int, default=getattr(GigaSpec, key))
    p.add_argument("--mpp", type=float, default=GigaSpec.mpp)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = GigaSpec(width=a.width, height=a.height, mpp=a.mpp, tile=a.tile, quality=a.quality,
                    pieces=a.pieces, seed=a.seed)
    path, stats = gigapixel_slide(a.folder, spec, progress=not a.no_progress)
    print(json.dumps({"path": str(path), **stats}))


if __name__ == "__main__":
    main()
