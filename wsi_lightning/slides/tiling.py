"""Tiling by physical size: tiles of ``tile_size`` px at ``mpp`` µm/px on tissue.

Scanners differ in resolution (0.25 µm/px at 40x, 0.5 at 20x, and everything in between), so a
tile is defined by its size in microns, ``tile_size * mpp``. A 0.25 µm/px slide tiled at 0.5 µm/px
has tiles of ``2 * tile_size`` level-0 pixels, the same tissue as a 0.5 µm/px slide.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_lightning.errors import ConfigError, ManifestError, NoTissueError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.slides.reader import SlideReader
from wsi_lightning.slides.tissue import TissueMask, segment_tissue


@dataclass
class TileGrid:
    """Tiles of one slide.

    Attributes:
        coords: (N, 2) int64 level-0 top-left (x, y) of each tile.
        tile_size: output pixels per side.
        mpp: output microns per pixel.
        tile_size_um: tile side in microns (= tile_size * mpp).
        extent_level0: tile side in level-0 pixels (= round(tile_size * mpp / slide_mpp)).
        level: pyramid level the tiles are read from (``best_level_for_mpp(mpp)``).
        slide_mpp: level-0 microns per pixel of the slide.
        tissue_fraction: (N,) float32 tissue fraction of each tile.
    """

    coords: np.ndarray
    tile_size: int
    mpp: float
    tile_size_um: float
    extent_level0: int
    level: int
    slide_mpp: float
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    def read_tile(self, reader: SlideReader, i: int) -> np.ndarray:
        """Pixels of tile `i`. Returns (tile_size, tile_size, 3) uint8 RGB."""
        x, y = (int(v) for v in self.coords[i])
        return reader.read_at_mpp((x, y), (self.tile_size, self.tile_size), self.mpp)


def tile_slide(
    reader: SlideReader,
    tile_size: int,
    mpp: float,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
    stride: int | None = None,
) -> TileGrid:
    """Regular grid of tiles from (0, 0), keeping those with enough tissue.

    Args:
        reader: the slide.
        tile_size: output tile side in pixels.
        mpp: output microns per pixel.
        min_tissue: keep tiles whose tissue fraction is >= this (0 keeps every grid tile).
        tissue: precomputed mask (default: ``segment_tissue(reader)``).
        stride: step between tiles in output pixels (default `tile_size`: no overlap).

    Returns:
        TileGrid in row-major order (y, then x). Tiles whose origin lies inside the slide are
        considered, so the last row/column may extend past the edge (read as white).

    Raises:
        ConfigError: invalid sizes. NoTissueError: no tile has enough tissue.
    """
    if tile_size < 1 or not mpp > 0 or not 0 <= min_tissue <= 1:
        raise ConfigError(
            f"tiling needs tile_size >= 1, mpp > 0 and 0 <= min_tissue <= 1; got tile_size="
            f"{tile_size}, mpp={mpp}, min_tissue={min_tissue}"
        )
    if stride is not None and stride < 1:
        raise ConfigError(f"tiling stride must be >= 1 output pixel, got {stride}")
    slide_mpp = reader.mpp
    extent = round(tile_size * mpp / slide_mpp)
    if extent < 1:
        raise ConfigError(
            f"slide {reader.path}: a {tile_size} px tile at {mpp} µm/px is smaller than one "
            f"pixel of this {slide_mpp} µm/px slide; use a larger tile_size or mpp"
        )
    step = extent if stride is None else max(1, round(stride * mpp / slide_mpp))
    width, height = reader.dimensions
    ys, xs = np.meshgrid(np.arange(0, height, step), np.arange(0, width, step), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)  # (N, 2) row-major
    tissue = segment_tissue(reader) if tissue is None else tissue
    boxes = np.concatenate([coords, np.full_like(coords, extent)], axis=1)  # (N, 4)
    fraction = tissue.fractions(boxes, slide_mpp)
    keep = fraction >= min_tissue
    if not keep.any():
        raise NoTissueError(
            f"slide {reader.path}: no {tile_size} px tile at {mpp} µm/px has >= "
            f"{min_tissue:.0%} tissue ({tissue.tissue_fraction:.1%} of the thumbnail is tissue); "
            "lower tiling.min_tissue or tiling.tile_size, or check the tissue mask (the "
            "tiles/qc/<slide_id>.png image; save_tissue_png in Python)"
        )
    return TileGrid(
        coords=coords[keep],
        tile_size=int(tile_size),
        mpp=float(mpp),
        tile_size_um=float(tile_size * mpp),
        extent_level0=int(extent),
        level=reader.best_level_for_mpp(mpp),
        slide_mpp=float(slide_mpp),
        tissue_fraction=fraction[keep],
    )


def tile_file(tiles_dir: str | os.PathLike, slide_id: str) -> Path:
    """``tiles_dir/<slide_id>.npz``, the tile-coordinate file of one slide.

    Raises:
        ManifestError: ``slide_id`` is not a safe file name (``../x``, ``/abs/x``...), so the
            file could land outside ``tiles_dir``.
    """
    sid = safe_slide_id(slide_id, where=f"tile file in {tiles_dir}", error=ManifestError)
    return Path(tiles_dir) / f"{sid}.npz"


def write_tile_file(tiles_dir: str | os.PathLike, slide_id: str, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` (``coords`` (N, 2) int64 and any others) to :func:`tile_file` atomically
    (a temporary file in the same folder, then renamed), so a killed run leaves no partial file.

    Returns:
        The file written. Raises ``ManifestError`` before writing anything for an unsafe id.
    """
    path = tile_file(tiles_dir, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
