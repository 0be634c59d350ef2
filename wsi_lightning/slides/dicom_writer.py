"""Write an RGB image as a DICOM WSI pyramid with wsidicom (test and benchmark slides).

One file per level (VL Whole Slide Microscopy Image, TILED_FULL, JPEG baseline frames), each level
a 2x box reduction of the one before (``pyramid.pyramid_levels``, as in ``write_pyramid_tiff``).
wsidicom writes the files from an in-memory source: ``_ArrayLevel`` serves one level's tiles
(edge tiles padded with white) and ``_ArraySource`` the level instances with minimal metadata
(generated UIDs, one specimen, one optical path, pixel spacing from `mpp`). OpenSlide 4 reads the
result as vendor ``dicom`` with ``openslide.mpp-x`` = `mpp`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from wsidicom import WsiDicom
from wsidicom.codec import Channels, Encoder, JpegSettings, LossyCompressionIsoStandard
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData, WsiInstance
from wsidicom.metadata import (
    Equipment,
    Image,
    ImageType,
    Label,
    LossyCompression,
    OpticalPath,
    Patient,
    Pyramid,
    Series,
    Slide,
    Study,
    WsiMetadata,
)
from wsidicom.metadata.sample import SlideSample
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source

from wsi_lightning.slides.pyramid import pyramid_levels

log = logging.getLogger(__name__)


class _ArrayLevel(ImageData):
    """One pyramid level held as an (H, W, 3) uint8 array, served as `tile`-px JPEG frames."""

    def __init__(self, pixels: np.ndarray, mpp: float, tile: int, encoder: Encoder) -> None:
        super().__init__(encoder)
        self._pixels, self._mpp, self._tile = pixels, mpp, tile

    transfer_syntax = property(lambda self: self.encoder.transfer_syntax)
    image_size = property(lambda self: Size(self._pixels.shape[1], self._pixels.shape[0]))
    tile_size = property(lambda self: Size(self._tile, self._tile))
    pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000))  # mm/px
    imaged_size = property(lambda self: None)
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: self.encoder.photometric_interpretation)
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)
    thread_safe = property(lambda self: True)
    transcoder = property(lambda self: None)

    @property
    def lossy_compression(self) -> list[LossyCompression]:
        return [LossyCompression(LossyCompressionIsoStandard.JPEG_LOSSY, 10.0)]

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        """(tile, tile, 3) uint8 pixels of a tile; beyond the image edge is white."""
        t, x, y = self._tile, tile_point.x * self._tile, tile_point.y * self._tile
        out = np.full((t, t, 3), 255, np.uint8)
        part = self._pixels[y : y + t, x : x + t]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class _ArraySource(Source):
    """The level instances of one slide (no label, overview, thumbnail or annotations)."""

    def __init__(self, levels: list[np.ndarray], mpp: float, tile: int, encoder: Encoder) -> None:
        super().__init__()
        metadata = WsiMetadata(
            study=Study(uid=generate_uid()),
            series=Series(uid=generate_uid(), number=1),
            patient=Patient(),
            equipment=Equipment(manufacturer="wsi_lightning", model_name="synthetic"),
            slide=Slide(samples=[SlideSample(identifier="sample", uid=generate_uid())]),
            pyramid=Pyramid(image=Image(), optical_paths=[OpticalPath(identifier="0")], uid=generate_uid()),
            label=Label(),
            frame_of_reference_uid=generate_uid(),
            dimension_organization_uids=[generate_uid()],
        )
        width = levels[0].shape[1]
        self._levels = []
        for i, pixels in enumerate(levels):
            dataset = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, True)
            data = _ArrayLevel(pixels, mpp * width / pixels.shape[1], tile, encoder)
            self._levels.append(WsiInstance.create_instance(data, dataset, ImageType.VOLUME, i))

    base_dataset = property(lambda self: self._levels[0].dataset)
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: [])
    overview_instances = property(lambda self: [])
    thumbnail_instances = property(lambda self: [])
    annotation_instances = property(lambda self: [])

    def close(self) -> None:
        """Nothing to release: the levels are arrays."""


def write_dicom_wsi(
    folder: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    n_levels: int = 4,
    tile: int = 256,
    quality: int = 90,
    photometric: str = "YBR_FULL_422",
) -> list[Path]:
    """Write `image` as a DICOM WSI (one ``.dcm`` per level) into a new or empty `folder`.

    The files are written into a temporary folder beside `folder`, which is then renamed.

    Args:
        folder: output folder (created; must not exist or be empty).
        image: (H, W, 3) uint8 RGB level 0.
        mpp: level-0 microns per pixel.
        n_levels: number of levels, each half the size of the previous one.
        tile: tile side in pixels (multiple of 16).
        quality: JPEG quality.
        photometric: ``"YBR_FULL_422"`` (YCbCr 4:2:2 frames, what scanners write) or ``"RGB"``
            (RGB frames, no subsampling, as converted from Aperio SVS).

    Returns:
        The written files, in the order wsidicom wrote them (level 0 first).
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if photometric not in ("YBR_FULL_422", "RGB"):
        raise ValueError(f"photometric {photometric!r}: expected 'YBR_FULL_422' or 'RGB'")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"DICOM WSI folder {folder} is not empty; choose a new folder")
    channels = Channels.YBR if photometric == "YBR_FULL_422" else Channels.RGB
    settings = JpegSettings(quality=quality, channels=channels)
    if channels is Channels.RGB:
        settings = JpegSettings(quality=quality, channels=channels, subsampling=None)
    encoder = Encoder.create_for_settings(settings)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with WsiDicom(_ArraySource(pyramid_levels(image, n_levels), mpp, tile, encoder)) as wsi:
            names = [Path(str(f)).name for f in wsi.save(tmp, workers=1)]
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.debug("wrote DICOM WSI %s (%d files)", folder, len(names))
    return [folder / name for name in names]
