"""Write an RGB image as a pyramidal, JPEG-tiled TIFF that OpenSlide reads like an Aperio SVS.

Recipe verified in ``docs/environment.md``: one top-level page per level (SubIFD levels are invisible to
OpenSlide), ``subfiletype`` 0 then 1, resolution in pixels per centimetre, and an Aperio-style
ImageDescription so OpenSlide reports vendor ``aperio``, ``openslide.mpp-x`` and objective power.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

log = logging.getLogger(__name__)


def aperio_description(
    width: int,
    height: int,
    level_size: tuple[int, int] | None,
    tile: int,
    quality: int,
    mpp: float,
    app_mag: float,
) -> str:
    """Aperio ImageDescription; `level_size` adds the ``-> WxH`` of a reduced level."""
    reduced = f" -> {level_size[0]}x{level_size[1]}" if level_size else ""
    return (
        f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}){reduced} JPEG/RGB Q={quality}|AppMag = {app_mag:g}|MPP = {mpp:g}"
    )


def pyramid_levels(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 and successive 2x box-filtered halvings (stops before a side drops below 1 px).

    Args:
        image: (H, W, 3) uint8.

    Returns:
        list of (H / 2**i, W / 2**i, 3) uint8 (sizes rounded up, like PIL's ``reduce``).
    """
    levels = [image]
    for _ in range(n_levels - 1):
        h, w = levels[-1].shape[:2]
        if min(h, w) < 2:
            break
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def write_pyramid_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    n_levels: int = 4,
    tile: int = 256,
    quality: int = 90,
    aperio: bool = True,
    app_mag: float | None = None,
) -> None:
    """Write `image` as a tiled JPEG pyramid, atomically (temporary file + ``os.replace``).

    Args:
        path: output ``.tiff``/``.svs`` path.
        image: (H, W, 3) uint8 RGB level 0.
        mpp: level-0 microns per pixel.
        n_levels: number of levels, each half the size of the previous one.
        tile: tile side in pixels (multiple of 16).
        quality: JPEG quality.
        aperio: write an Aperio ImageDescription (vendor ``aperio``; else ``generic-tiff``).
        app_mag: objective power to record; default ``10 / mpp`` (0.5 -> 20x, 0.25 -> 40x).
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    app_mag = round(10.0 / mpp, 2) if app_mag is None else app_mag
    height, width = image.shape[:2]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
            for i, level in enumerate(pyramid_levels(image, n_levels)):
                lh, lw = level.shape[:2]
                level_mpp = mpp * width / lw
                desc = None
                if aperio:
                    size = (lw, lh) if i else None
                    desc = aperio_description(width, height, size, tile, quality, mpp, app_mag)
                tw.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    description=desc,
                    metadata=None,
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.debug("wrote %s (%dx%d, %d levels)", path, width, height, n_levels)
