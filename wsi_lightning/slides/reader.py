"""Whole-slide image reading: ``SlideReader`` (one slide) and ``SlideCache`` (many, bounded).

Coordinates follow OpenSlide: a location is the top-left corner in level-0 pixels, a size is
(width, height) in pixels of the level read, arrays are (h, w, 3) uint8 RGB with everything outside
the slide white. Physical size is the unit that matters across scanners, so ``read_at_mpp`` reads a
box at a requested microns-per-pixel from the best pyramid level and resizes only when needed.

Two backends give the same levels, properties and pixels (within JPEG-decoder rounding):
``fast`` decodes JPEG tiles directly, of tiled TIFF/SVS files (``fastpath.py``, ~5x faster than
OpenSlide on tile reads) and of DICOM WSI (``dicom.py``, frames found by wsidicom), and
``openslide`` handles every other format. A DICOM WSI may be given as its folder or as any of
its ``.dcm`` files.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_lightning.errors import ConfigError, SlideError
from wsi_lightning.slides.dicom import DicomJpegSlide, dicom_files
from wsi_lightning.slides.fastpath import FastPathUnavailable, JpegTiffSlide, TiledJpegSlide

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "openslide")
MPP_RTOL = 0.01  # a level within 1% of the requested mpp is used as is (no resampling)
_REOPEN_HINT = "check the file is a complete whole-slide image (re-download/re-copy it)"


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (h, w, 4) non-premultiplied RGBA on white -> (h, w, 3) uint8."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a)
    return ((rgb + 127) // 255).astype(np.uint8)


class SlideReader:
    """One open whole-slide image.

    Args:
        path: slide file (anything OpenSlide opens), or a DICOM WSI folder.
        mpp: level-0 microns per pixel from the manifest; overrides the slide's own
            ``openslide.mpp-x``.
        backend: ``"auto"`` (fast path for JPEG-tiled TIFF/SVS/DICOM, else OpenSlide), ``"fast"``
            (fast path or error) or ``"openslide"``.
        tile_cache: decoded tiles kept by the fast path (LRU, ~200 KB each); 0 disables.

    Raises:
        SlideError: missing, unreadable, truncated or unsupported file (or ``"fast"`` impossible).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp: float | None = None,
        backend: str = "auto",
        tile_cache: int = 16,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"slide backend {backend!r} is unknown; expected one of {BACKENDS}")
        self.path = Path(path)
        self._args = (mpp, backend, tile_cache)
        if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise SlideError(
                f"slide {self.path}: mpp override {mpp!r} is not a positive number of microns "
                "per pixel; fix the 'mpp' column of the manifest for this slide"
            )
        self._mpp_override = None if mpp is None else float(mpp)
        osr, self._file = _open_openslide(self.path)
        self.properties: dict[str, str] = dict(osr.properties)
        self.level_count: int = osr.level_count
        self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in osr.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in osr.level_downsamples]
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.vendor: str | None = self.properties.get("openslide.vendor")
        power = self.properties.get("openslide.objective-power")
        self.objective_power: float | None = _to_float(power)
        self._osr: openslide.OpenSlide | None = None
        self._fast: TiledJpegSlide | None = None
        if backend in ("auto", "fast"):
            self._fast = self._try_fast(backend, tile_cache)
        if self._fast is not None:
            osr.close()
            self.backend = "fast"
        else:
            self._osr = osr
            self.backend = "openslide"

    def _try_fast(self, backend: str, tile_cache: int) -> TiledJpegSlide | None:
        tiles = [
            (
                int(self.properties.get(f"openslide.level[{i}].tile-width", 0)),
                int(self.properties.get(f"openslide.level[{i}].tile-height", 0)),
            )
            for i in range(self.level_count)
        ]
        tile_sizes = [t if all(t) else None for t in tiles]
        geometry = (self.level_dimensions, self.level_downsamples, tile_sizes)
        try:
            if self.vendor == "dicom":
                return DicomJpegSlide(self._file, *geometry, tile_cache=tile_cache)
            return JpegTiffSlide(self._file, self.vendor, *geometry, tile_cache=tile_cache)
        except FastPathUnavailable as err:
            if backend == "fast":
                raise SlideError(
                    f"slide {self.path}: the fast path cannot read this file ({err}); "
                    "use backend='auto' or 'openslide'"
                ) from err
            log.debug("slide %s: using OpenSlide (%s)", self.path, err)
        except OSError as err:
            raise SlideError(f"cannot open slide {self.path}: {err}; {_REOPEN_HINT}") from err
        return None

    def __reduce__(self):
        """Pickle as (path, args): a DataLoader worker reopens the file instead of sharing it."""
        return (SlideReader, (self.path, *self._args))

    # -- geometry ------------------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel (manifest override, else ``openslide.mpp-x``)."""
        if self._mpp_override is not None:
            return self._mpp_override
        mpp = _to_float(self.properties.get(openslide.PROPERTY_NAME_MPP_X))
        if mpp is None or not mpp > 0:
            raise SlideError(
                f"slide {self.path}: no microns-per-pixel in the slide properties "
                "(openslide.mpp-x); add an 'mpp' column to the manifest for this slide"
            )
        return mpp

    def _check_level(self, level: int) -> int:
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"slide {self.path}: level {level} does not exist; "
                f"this slide has levels 0..{self.level_count - 1}"
            )
        return int(level)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of `level`."""
        return self.mpp * self.level_downsamples[self._check_level(level)]

    def best_level_for_mpp(self, mpp: float) -> int:
        """Coarsest level whose mpp is <= `mpp` (1% tolerance); level 0 if `mpp` is finer."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1 + MPP_RTOL):
                best = level
        return best

    # -- pixels --------------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a box like ``OpenSlide.read_region``, composited on white.

        Args:
            location: (x, y) top-left in level-0 pixels.
            level: pyramid level to read.
            size: (w, h) in pixels of `level`.

        Returns:
            (h, w, 3) uint8 RGB; areas outside the slide are 255.
        """
        level = self._check_level(level)
        loc = (int(location[0]), int(location[1]))
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"slide {self.path}: read size {size} must be positive")
        try:
            if self._fast is not None:
                return self._fast.read_region(loc, level, (w, h))
            if self._osr is None:
                raise SlideError(f"slide {self.path}: the reader is closed; open a new one")
            return rgba_to_rgb(np.asarray(self._osr.read_region(loc, level, (w, h))))
        except (openslide.OpenSlideError, OSError, ValueError, RuntimeError) as err:
            raise SlideError(
                f"slide {self.path}: reading {w}x{h} px at level {level} from {loc} failed "
                f"({err}); {_REOPEN_HINT}"
            ) from err

    def read_at_mpp(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float
    ) -> np.ndarray:
        """Read a box at a physical resolution.

        Args:
            location: (x, y) top-left in level-0 pixels.
            size: (w, h) output pixels; the box covers ``size * mpp / self.mpp`` level-0 pixels.
            mpp: output microns per pixel.

        Returns:
            (h, w, 3) uint8 RGB, read from ``best_level_for_mpp(mpp)`` and resized (antialiased)
            only if that level's mpp differs from `mpp` by more than 1%.
        """
        w, h = int(size[0]), int(size[1])
        level = self.best_level_for_mpp(mpp)
        scale = mpp / self.level_mpp(level)  # level pixels per output pixel
        if abs(scale - 1) <= MPP_RTOL:
            return self.read_region(location, level, (w, h))
        src_w, src_h = w * scale, h * scale
        region = self.read_region(location, level, (math.ceil(src_w), math.ceil(src_h)))
        resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BICUBIC
        img = Image.fromarray(region).resize((w, h), resample, box=(0, 0, src_w, src_h))
        return np.asarray(img)

    def thumbnail(
        self, mpp: float | None = None, max_size: int | None = None
    ) -> tuple[np.ndarray, float]:
        """Whole-slide thumbnail.

        Args:
            mpp: thumbnail microns per pixel.
            max_size: longest side in pixels (default 1024 when `mpp` is not given); with both,
                the coarser of the two resolutions is used.

        Returns:
            ((h, w, 3) uint8 RGB covering the whole slide, its mpp).
        """
        if mpp is None and max_size is None:
            max_size = 1024
        w0, h0 = self.dimensions
        target = float(mpp) if mpp is not None else 0.0
        if max_size is not None:
            target = max(target, max(w0, h0) * self.mpp / max_size)
        w = max(1, math.ceil(w0 * self.mpp / target - 1e-6))
        h = max(1, math.ceil(h0 * self.mpp / target - 1e-6))
        return self.read_at_mpp((0, 0), (w, h), target), target

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handles (idempotent)."""
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"SlideReader({str(self.path)!r}, {w}x{h}, levels={self.level_count}, backend={self.backend!r})"


def _to_float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _open_openslide(path: Path) -> tuple[openslide.OpenSlide, Path]:
    """(``openslide.OpenSlide``, the file it opened) with errors that name the file and say what
    to do; a folder is a DICOM WSI, opened through its first ``.dcm`` file."""
    if not path.exists():
        raise SlideError(
            f"cannot open slide {path}: file not found; check the manifest 'path' column "
            "(relative paths are resolved from the manifest's folder) and that the data is mounted"
        )
    if path.is_dir():
        files = dicom_files(path)
        if not files:
            raise SlideError(
                f"cannot open slide {path}: it is a folder without .dcm files; point to the "
                "slide file (a folder is read as a DICOM WSI, one series of .dcm files)"
            )
        path = files[0]
    try:
        return openslide.OpenSlide(path), path
    except openslide.OpenSlideUnsupportedFormatError as err:
        reason = f"not a whole-slide image OpenSlide can read, or a damaged one ({err})"
    except (openslide.OpenSlideError, OSError) as err:
        reason = str(err)
    raise SlideError(f"cannot open slide {path}: {reason}; {_REOPEN_HINT}")


class SlideCache:
    """Bounded LRU of open ``SlideReader``s, opened on first use.

    Safe across ``fork`` (DataLoader workers, DDP): a process that inherits a filled cache
    forgets the inherited readers (without closing them, they belong to the parent) and starts
    empty. Pickling (spawn) also gives an empty cache.

    Args:
        max_open: most readers kept open; the least recently used is closed beyond that.
        backend: backend passed to every ``SlideReader``.
    """

    def __init__(self, max_open: int = 16, backend: str = "auto") -> None:
        if max_open < 1:
            raise ConfigError(f"SlideCache max_open must be >= 1, got {max_open}")
        self.max_open = int(max_open)
        self.backend = backend
        self._pid = os.getpid()
        self._readers: OrderedDict[tuple[str, float | None], SlideReader] = OrderedDict()
        self._inherited: list[SlideReader] = []  # kept referenced so GC never closes them

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            self._inherited.extend(self._readers.values())
            self._readers = OrderedDict()
            self._pid = os.getpid()

    def get(self, path: str | os.PathLike, mpp: float | None = None) -> SlideReader:
        """The open reader for `path` (opened now if needed)."""
        self._check_pid()
        key = (os.path.abspath(path), None if mpp is None else float(mpp))
        reader = self._readers.get(key)
        if reader is not None:
            self._readers.move_to_end(key)
            return reader
        reader = SlideReader(path, mpp=mpp, backend=self.backend)
        self._readers[key] = reader
        while len(self._readers) > self.max_open:
            _, old = self._readers.popitem(last=False)
            old.close()
        return reader

    def clear(self) -> None:
        """Close every reader this process opened."""
        self._check_pid()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __len__(self) -> int:
        self._check_pid()
        return len(self._readers)

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
