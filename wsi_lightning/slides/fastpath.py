"""Direct JPEG-tile reading for tiled TIFF and Aperio SVS slides (and, in ``dicom.py``, DICOM WSI).

OpenSlide spends most of a tile read copying pixels (ARGB surfaces, cairo compositing), not
decoding JPEG (`docs/environment.md`: 0.19x of the decode limit). For the common case, a TIFF whose
pyramid levels are top-level tiled pages of JPEG tiles, we read each tile's bytes at its file
offset (one ``os.pread``) and decode them with imagecodecs (libjpeg-turbo), which reaches ~0.9x
of the raw decode limit.

The level list must be exactly OpenSlide's, so the properties, mpp and level indices a caller gets
do not depend on the backend: we rebuild it with OpenSlide's rules (generic-tiff: the first page
and reduced-resolution tiled pages, widest first; aperio: every tiled page in file order; SubIFDs
are never levels) and then check it against the level sizes and tile sizes OpenSlide reported.
Anything we are not sure of raises ``FastPathUnavailable`` and the reader falls back to OpenSlide.
``TiledJpegSlide`` holds what does not depend on the container (decoding, the tile cache, the
geometry below); a subclass only finds each tile's bytes.

``read_region`` reproduces OpenSlide's geometry: a level-0 location maps to ``location / downsample``
at the level; a fractional position is resampled bilinearly (as cairo does), negative coordinates
shift the output by whole level pixels (as ``openslide_read_region`` does), and everything outside
the level is white (OpenSlide's transparent pixels composited on white).
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from wsi_lightning.errors import SlideError

log = logging.getLogger(__name__)

JPEG = 7  # TIFF Compression tag value for "new-style" JPEG
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6
JCS_RGB, JCS_YCBCR = 2, 3  # libjpeg colour-space ids, as accepted by imagecodecs.jpeg8_decode
FAST_VENDORS = ("aperio", "generic-tiff")


class FastPathUnavailable(Exception):
    """The file cannot be read by the fast path; the message says why (for logs/errors)."""


@dataclass(frozen=True)
class JpegLevel:
    """One pyramid level stored as a grid of JPEG tiles.

    Attributes:
        width, height: level size in pixels.
        tile_width, tile_height: tile size in pixels.
        across, down: number of tile columns / rows.
        tables: shared JPEGTables bytes (abbreviated tiles, e.g. Aperio), or None.
        colorspace: libjpeg colour space of the tile data (from the photometric tag).
        offsets, counts: TIFF only: (down * across,) int64 file offset and byte count of each
            tile (row-major); a count of 0 is a missing tile, read as white.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    across: int
    down: int
    tables: bytes | None
    colorspace: int
    offsets: np.ndarray | None = None
    counts: np.ndarray | None = None


def decode_tile(data: bytes, level: JpegLevel) -> np.ndarray:
    """Decode one tile's JPEG bytes exactly as the fast path does (also used by the benchmark).

    Returns:
        (tile_height, tile_width, 3) uint8 RGB.
    """
    return imagecodecs.jpeg8_decode(
        data, tables=level.tables, colorspace=level.colorspace, outcolorspace=JCS_RGB
    )


def _candidate_pages(tif: tifffile.TiffFile, vendor: str) -> list[tifffile.TiffPage]:
    """Top-level pages OpenSlide would list as levels, in OpenSlide's order."""
    pages = [tif.pages[i] for i in range(len(tif.pages))]
    if vendor == "aperio":
        return [p for p in pages if p.is_tiled]
    levels = [p for p in pages if p.is_tiled and (p.index == 0 or (p.subfiletype & 1))]
    return sorted(levels, key=lambda p: -p.imagewidth)  # stable, like OpenSlide's width sort


def _jpeg_level(page: tifffile.TiffPage, file_size: int, path: Path) -> JpegLevel:
    """Validate one page and extract what decoding its tiles needs."""
    if page.compression != JPEG:
        raise FastPathUnavailable(f"page {page.index} compression is {page.compression}, not JPEG")
    if page.photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
        raise FastPathUnavailable(f"page {page.index} photometric {page.photometric}")
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != 1:
        raise FastPathUnavailable(f"page {page.index} is not 8-bit interleaved 3-channel")
    if page.imagedepth != 1 or page.extrasamples:
        raise FastPathUnavailable(f"page {page.index} has depth or extra samples")
    across = math.ceil(page.imagewidth / page.tilewidth)
    down = math.ceil(page.imagelength / page.tilelength)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape != (across * down,) or counts.shape != offsets.shape:
        raise FastPathUnavailable(f"page {page.index} tile table has an unexpected size")
    present = counts > 0
    if present.any() and int((offsets + counts)[present].max()) > file_size:
        raise SlideError(
            f"cannot open slide {path}: level data ends beyond the end of the file "
            f"({file_size} bytes), so the file is truncated; check the file is a complete "
            "whole-slide image (re-download/re-copy it)"
        )
    # like OpenSlide: the TIFF photometric tag decides (JFIF/Adobe markers are not consulted)
    colorspace = JCS_YCBCR if page.photometric == PHOTOMETRIC_YCBCR else JCS_RGB
    tables = page.jpegtables
    return JpegLevel(
        width=page.imagewidth,
        height=page.imagelength,
        tile_width=page.tilewidth,
        tile_height=page.tilelength,
        across=across,
        down=down,
        offsets=offsets,
        counts=counts,
        tables=bytes(tables) if tables else None,
        colorspace=colorspace,
    )


class TiledJpegSlide(ABC):
    """Pyramid levels stored as grids of JPEG tiles, read like OpenSlide (subclasses find the bytes).

    A subclass sets ``levels`` (checked against OpenSlide's with ``check_levels``),
    ``level_downsamples`` and the tile cache (``init_cache``), and implements ``tile_bytes``;
    decoding, caching and OpenSlide's ``read_region`` geometry are shared.
    """

    levels: list[JpegLevel]
    level_downsamples: list[float]

    def init_cache(self, level_downsamples: list[float], tile_cache: int) -> None:
        """Set the downsamples (to map level-0 locations) and an LRU of `tile_cache` tiles."""
        self.level_downsamples = [float(d) for d in level_downsamples]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = max(0, int(tile_cache))

    @staticmethod
    def check_levels(levels: list[JpegLevel], level_dimensions, tile_sizes) -> list[JpegLevel]:
        """`levels` if they are OpenSlide's (sizes, then tile sizes where given), else raise."""
        dims = [(lv.width, lv.height) for lv in levels]
        if dims != [tuple(d) for d in level_dimensions]:
            raise FastPathUnavailable(f"levels {dims} differ from OpenSlide's {level_dimensions}")
        for lv, ts in zip(levels, tile_sizes or [], strict=False):
            if ts is not None and tuple(ts) != (lv.tile_width, lv.tile_height):
                raise FastPathUnavailable("tile sizes differ from OpenSlide's")
        return levels

    # -- tiles --------------------------------------------------------------------------------
    @abstractmethod
    def tile_bytes(self, level: int, tx: int, ty: int) -> bytes | None:
        """Raw JPEG bytes of tile (tx, ty) of `level`, or None for a missing tile."""

    def read_tile(self, level: int, tx: int, ty: int) -> tuple[np.ndarray | None, bool]:
        """Decoded tile and whether it is shared with the cache (then the caller must copy).

        Returns:
            ((tile_height, tile_width, 3) uint8 or None for a missing tile, shared flag).
        """
        key = (level, ty * self.levels[level].across + tx)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile, True
        data = self.tile_bytes(level, tx, ty)
        if data is None:
            return None, False
        tile = decode_tile(data, self.levels[level])
        if self._cache_size:
            self._cache[key] = tile
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tile, self._cache_size > 0

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of a box in `level` coordinates; outside the level is white.

        Returns:
            (h, w, 3) uint8 RGB.
        """
        lv = self.levels[level]
        tw, th = lv.tile_width, lv.tile_height
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)  # clip to the level
        cx0, cy0 = max(x, 0), max(y, 0)
        if cx0 >= x1 or cy0 >= y1:
            return np.full((h, w, 3), 255, np.uint8)
        tx0, tx1, ty0, ty1 = cx0 // tw, (x1 - 1) // tw, cy0 // th, (y1 - 1) // th
        if tx0 == tx1 and ty0 == ty1 and (x, y, w, h) == (tx0 * tw, ty0 * th, tw, th):
            tile, shared = self.read_tile(level, tx0, ty0)  # exactly one whole interior tile
            if tile is not None and tile.shape[:2] == (th, tw) and x1 - x == w and y1 - y == h:
                return tile.copy() if shared else tile
        out = np.full((h, w, 3), 255, np.uint8)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile, _ = self.read_tile(level, tx, ty)
                if tile is None:
                    continue
                # intersection of the tile, the request and the level, in level coordinates
                ax0, ay0 = max(tx * tw, cx0), max(ty * th, cy0)
                ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                    ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
                ]
        return out

    # -- OpenSlide-compatible region read ---------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Like ``OpenSlide.read_region`` composited on white.

        Args:
            location: (x, y) top-left in level-0 pixels.
            level: pyramid level.
            size: (w, h) in `level` pixels.

        Returns:
            (h, w, 3) uint8 RGB.
        """
        x0, y0 = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        # openslide_read_region: negative coordinates shift the output by whole level pixels
        sx = int(-x0 / ds) if x0 < 0 else 0
        sy = int(-y0 / ds) if y0 < 0 else 0
        x0, y0 = max(x0, 0), max(y0, 0)
        rw, rh = w - sx, h - sy
        if rw <= 0 or rh <= 0:
            return np.full((h, w, 3), 255, np.uint8)
        fx, fy = x0 / ds, y0 / ds
        ix, iy = math.floor(fx), math.floor(fy)
        ax, ay = fx - ix, fy - iy
        if ax == 0 and ay == 0:
            region = self.read_level(level, ix, iy, rw, rh)
        else:  # cairo samples between pixel centres: bilinear with weights (1-a, a)
            src = self.read_level(level, ix, iy, rw + 1, rh + 1).astype(np.float32)
            rows = (1 - ay) * src[:-1] + ay * src[1:]  # (rh, rw + 1, 3)
            region = ((1 - ax) * rows[:, :-1] + ax * rows[:, 1:] + 0.5).astype(np.uint8)
        if sx == 0 and sy == 0:
            return region
        out = np.full((h, w, 3), 255, np.uint8)
        out[sy:, sx:] = region
        return out

    def close(self) -> None:
        """Drop cached tiles (subclasses also release their files)."""
        self._cache.clear()


class JpegTiffSlide(TiledJpegSlide):
    """Reads JPEG-tiled TIFF/SVS levels by decoding tile bytes directly.

    Args:
        path: the slide file.
        vendor: OpenSlide's ``openslide.vendor`` for this file.
        level_dimensions: OpenSlide's (width, height) per level; the levels must match exactly.
        level_downsamples: OpenSlide's downsample per level (used to map level-0 locations).
        tile_sizes: OpenSlide's (tile width, tile height) per level, or None to skip that check.
        tile_cache: how many decoded tiles to keep (LRU); 0 disables caching.

    Raises:
        FastPathUnavailable: the file is not one we can read faithfully (use OpenSlide).
        SlideError: the file is truncated.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        vendor: str | None,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        tile_sizes: list[tuple[int, int] | None] | None = None,
        tile_cache: int = 16,
    ) -> None:
        self.path = Path(path)
        if vendor not in FAST_VENDORS:
            raise FastPathUnavailable(f"vendor {vendor!r} is not one of {FAST_VENDORS}")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.levels = self._read_levels(vendor, level_dimensions, tile_sizes)
        except BaseException:
            os.close(self._fd)
            raise
        self.init_cache(level_downsamples, tile_cache)

    def _read_levels(self, vendor, level_dimensions, tile_sizes) -> list[JpegLevel]:
        file_size = os.fstat(self._fd).st_size
        tif_log = logging.getLogger("tifffile")
        old_level = tif_log.level
        tif_log.setLevel(logging.CRITICAL)  # a damaged file is reported by us, not tifffile
        try:
            with tifffile.TiffFile(self.path) as tif:
                pages = _candidate_pages(tif, vendor)
                levels = [_jpeg_level(p, file_size, self.path) for p in pages]
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError) as err:
            raise FastPathUnavailable(f"tifffile cannot parse the file: {err}") from err
        finally:
            tif_log.setLevel(old_level)
        return self.check_levels(levels, level_dimensions, tile_sizes)

    def tile_bytes(self, level: int, tx: int, ty: int) -> bytes | None:
        """Raw JPEG bytes of tile (tx, ty) of `level`, or None for a missing tile."""
        lv = self.levels[level]
        i = ty * lv.across + tx
        count = int(lv.counts[i])
        if count == 0:
            return None
        return os.pread(self._fd, count, int(lv.offsets[i]))

    def close(self) -> None:
        """Close the file descriptor and drop cached tiles."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()
