"""Direct JPEG-tile reading for DICOM whole-slide images (VL Whole Slide Microscopy Image IOD).

A DICOM WSI is a folder of files, one per pyramid level (plus label/overview), each holding its
level's tiles as encapsulated JPEG frames. OpenSlide 4 reads them (vendor ``dicom``) but, as for
TIFF, spends most of a tile read copying pixels. wsidicom parses the files and hands us a frame's
bytes (it resolves TILED_FULL/TILED_SPARSE layouts, offset tables and concatenations); we decode
them with the fast path's own decoder (``fastpath.decode_tile``, libjpeg-turbo), so the pixels are
those of the TIFF fast path and of OpenSlide (the same library, the same default upsampling).
``bench/bench_formats.py`` measures it against OpenSlide, wsidicom's own decoding and fastslide.

Only what we can read faithfully takes this path: JPEG baseline 8-bit RGB frames (photometric
YBR_FULL_422, YBR_FULL or RGB), one focal plane and one optical path per level, and levels that
are exactly OpenSlide's (sizes and tile sizes, OpenSlide's widest-first order). Anything else
raises ``FastPathUnavailable`` and the reader uses OpenSlide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from wsi_lightning.slides.fastpath import (
    JCS_RGB,
    JCS_YCBCR,
    FastPathUnavailable,
    JpegLevel,
    TiledJpegSlide,
)

log = logging.getLogger(__name__)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # transfer syntax UID of 8-bit baseline JPEG frames
COLORSPACES = {"YBR_FULL_422": JCS_YCBCR, "YBR_FULL": JCS_YCBCR, "RGB": JCS_RGB}


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files of a folder, sorted by name (a DICOM WSI given as its folder)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")


class DicomJpegSlide(TiledJpegSlide):
    """Reads the JPEG frames of a DICOM WSI through wsidicom and decodes them directly.

    Args:
        path: one file of the slide's series (what OpenSlide opened); wsidicom opens the
            series' files in its folder.
        level_dimensions: OpenSlide's (width, height) per level; the levels must match exactly.
        level_downsamples: OpenSlide's downsample per level (used to map level-0 locations).
        tile_sizes: OpenSlide's (tile width, tile height) per level, or None to skip that check.
        tile_cache: how many decoded tiles to keep (LRU); 0 disables caching.

    Raises:
        FastPathUnavailable: wsidicom is not installed, cannot open the folder, or the slide is
            not one we can read faithfully (use OpenSlide).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        tile_sizes: list[tuple[int, int] | None] | None = None,
        tile_cache: int = 16,
    ) -> None:
        self.path = Path(path)
        try:
            from wsidicom import WsiDicom
            from wsidicom.config import Settings
            from wsidicom.geometry import Point
        except ImportError as err:  # an optional speed-up: OpenSlide reads DICOM without it
            raise FastPathUnavailable(f"wsidicom is not installed ({err})") from err
        self._point = Point
        # no frame caches of its own: we keep decoded tiles (and a SlideCache many slides)
        settings = Settings(decoded_frame_cache_size=0, encoded_frame_cache_size=0)
        try:
            self._wsi = WsiDicom.open(self.path.parent, settings=settings)
        except Exception as err:  # any failure to parse means: let OpenSlide read it
            raise FastPathUnavailable(f"wsidicom cannot open {self.path.parent}: {err}") from err
        try:
            self._check_series()
            self._frames, levels = self._read_levels()
            self.levels = self.check_levels(levels, level_dimensions, tile_sizes)
        except BaseException:
            self._wsi.close()
            raise
        self.init_cache(level_downsamples, tile_cache)

    def _check_series(self) -> None:
        """The folder's slide must be the series of the file OpenSlide opened."""
        import pydicom

        header = pydicom.dcmread(self.path, stop_before_pixels=True)
        uids = self._wsi.uids
        if uids is None or str(uids.series_instance) != str(header.SeriesInstanceUID):
            raise FastPathUnavailable(f"{self.path.parent} holds another series than {self.path}")

    def _read_levels(self) -> tuple[list[tuple], list[JpegLevel]]:
        """(image data, focal plane, optical path) and a JpegLevel per level, widest first."""
        frames, levels = [], []
        for group in sorted(self._wsi.levels, key=lambda g: -g.size.width):
            if len(group.instances) != 1:
                raise FastPathUnavailable(f"level {group.level} is split over several instances")
            instance = group.default_instance
            data = instance.image_data
            kind = str(data.photometric_interpretation)
            if str(data.transfer_syntax) != JPEG_BASELINE or kind not in COLORSPACES:
                raise FastPathUnavailable(
                    f"level {group.level} is {data.transfer_syntax} {kind}, not baseline JPEG RGB"
                )
            if data.samples_per_pixel != 3 or data.bits != 8:
                raise FastPathUnavailable(f"level {group.level} is not 8-bit 3-channel")
            if len(data.focal_planes) != 1 or len(data.optical_paths) != 1:
                raise FastPathUnavailable(f"level {group.level} has several focal planes/paths")
            tiled = data.tiled_size
            frames.append((data, instance.default_z, instance.default_path))
            levels.append(
                JpegLevel(
                    width=group.size.width,
                    height=group.size.height,
                    tile_width=data.tile_size.width,
                    tile_height=data.tile_size.height,
                    across=tiled.width,
                    down=tiled.height,
                    tables=None,
                    colorspace=COLORSPACES[kind],
                )
            )
        return frames, levels

    def tile_bytes(self, level: int, tx: int, ty: int) -> bytes | None:
        """Encoded JPEG frame of tile (tx, ty) of `level`, or None for a missing (sparse) tile."""
        data, z, path = self._frames[level]
        point = self._point(tx, ty)
        if data.is_sparse(point, z, path):
            return None
        return data.get_encoded_tile(point, z, path)

    def close(self) -> None:
        """Close the DICOM files and drop cached tiles."""
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None
        super().close()
