"""Deep Zoom (DZI) pyramids of a slide, written from :class:`~wsi_lightning.slides.SlideReader`.

The Deep Zoom layout (what OpenSeadragon's ``DziTileSource`` reads) of a ``W x H`` image:
levels ``0 .. L`` with ``L = ceil(log2(max(W, H)))``; level ``l`` is the image downsampled by
``2 ** (L - l)`` (``ceil`` of each side), cut into ``tile_size`` squares, each extended by
``overlap`` pixels on every side that has a neighbour, stored as ``<name>_files/<l>/<col>_<row>.jpeg``
beside ``<name>.dzi`` (XML: format, overlap, tile size, image size).

Every tile is read from the slide level closest above its resolution (our fast JPEG path where the
format allows, OpenSlide otherwise: the reader picks) and box-filtered down, as OpenSlide's own
``DeepZoomGenerator`` does, so any slide the reader opens (TIFF, SVS, DICOM WSI, ...) gets a
pyramid and memory stays one tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_lightning.slides import MPP_RTOL, SlideReader

DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"
TILE_SIZE = 254  # + 1 px overlap on each side: 256 px tiles inside the image
OVERLAP = 1
FORMAT = "jpeg"
QUALITY = 85


@dataclass(frozen=True)
class DeepZoomGeometry:
    """Levels and tiles of the Deep Zoom pyramid of a ``width x height`` image (level 0 of the slide)."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    @property
    def max_level(self) -> int:
        """The full-resolution level, ``ceil(log2(max(width, height)))``."""
        return (max(self.width, self.height) - 1).bit_length()

    def downsample(self, level: int) -> int:
        """Level-0 pixels per pixel of ``level``."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(w, h) of ``level``."""
        d = self.downsample(level)
        return -(-self.width // d), -(-self.height // d)

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_size(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of tile (col, row) in ``level`` pixels, overlap included."""
        w, h = self.level_size(level)
        t, o = self.tile_size, self.overlap
        x0, y0 = col * t - (o if col else 0), row * t - (o if row else 0)
        return x0, y0, min((col + 1) * t + o, w), min((row + 1) * t + o, h)

    @property
    def n_tiles(self) -> int:
        return sum(c * r for c, r in (self.tile_grid(lv) for lv in range(self.max_level + 1)))

    def dzi_xml(self, fmt: str = FORMAT) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_XMLNS}" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">\n'
                f'  <Size Width="{self.width}" Height="{self.height}"/>\n</Image>\n')

    def tile_source(self, tiles_url: str, fmt: str = FORMAT) -> dict[str, Any]:
        """The ``.dzi`` as the inline object OpenSeadragon takes (a page opened from ``file://``
        cannot fetch the XML itself, but loads the tiles as images).

        Args:
            tiles_url: URL of the ``<name>_files/`` folder, ending in ``/``.
        """
        return {"Image": {"xmlns": DZI_XMLNS, "Url": tiles_url, "Format": fmt, "Overlap": str(self.overlap),
                          "TileSize": str(self.tile_size),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}


def read_downsampled(reader: SlideReader, location: tuple[int, int], size: tuple[int, int],
                     downsample: float) -> np.ndarray:
    """A box of ``size`` output pixels, each ``downsample`` level-0 pixels wide, from ``location``
    (level-0 top-left): read from the coarsest level at least that fine, box-filtered to size.

    Returns:
        (h, w, 3) uint8 RGB (white outside the slide).
    """
    w, h = int(size[0]), int(size[1])
    level = max((lv for lv, ds in enumerate(reader.level_downsamples) if ds <= downsample * (1 + MPP_RTOL)),
                default=0)
    scale = downsample / reader.level_downsamples[level]  # level pixels per output pixel
    if abs(scale - 1) <= MPP_RTOL:
        return reader.read_region(location, level, (w, h))
    src_w, src_h = w * scale, h * scale
    region = reader.read_region(location, level, (math.ceil(src_w), math.ceil(src_h)))
    resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(region).resize((w, h), resample, box=(0, 0, src_w, src_h)))


def write_deep_zoom(reader: SlideReader, out_dir: Path, name: str, quality: int = QUALITY,
                    tile_size: int = TILE_SIZE, overlap: int = OVERLAP,
                    on_level: Callable[[int, int, int], None] | None = None,
                    on_tile: Callable[[], None] | None = None) -> DeepZoomGeometry:
    """Write ``out_dir/<name>.dzi`` and ``out_dir/<name>_files/`` (JPEG tiles) of a slide.

    Args:
        reader: the open slide.
        out_dir: folder to write into (created; the caller makes the write atomic).
        name: file stem of the ``.dzi``.
        quality: JPEG quality.
        tile_size: tile side without overlap.
        overlap: pixels each tile extends over its neighbours.
        on_level: called as ``on_level(level, max_level, n_tiles_of_level)`` before each level.
        on_tile: called after each tile.

    Returns:
        The pyramid's geometry.
    """
    geo = DeepZoomGeometry(*reader.dimensions, tile_size=tile_size, overlap=overlap)
    files = out_dir / f"{name}_files"
    for level in range(geo.max_level, -1, -1):  # the slow, full-resolution level first
        cols, rows = geo.tile_grid(level)
        if on_level is not None:
            on_level(level, geo.max_level, cols * rows)
        d = geo.downsample(level)
        (files / str(level)).mkdir(parents=True, exist_ok=True)
        for row in range(rows):
            for col in range(cols):
                x0, y0, x1, y1 = geo.tile_box(level, col, row)
                tile = read_downsampled(reader, (x0 * d, y0 * d), (x1 - x0, y1 - y0), d)
                Image.fromarray(tile).save(files / str(level) / f"{col}_{row}.{FORMAT}", "JPEG",
                                           quality=quality)
                if on_tile is not None:
                    on_tile()
    (out_dir / f"{name}.dzi").write_text(geo.dzi_xml())
    return geo
