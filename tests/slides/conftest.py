"""Tiny slides made on the fly: a known pattern, an Aperio-like SVS, rendered tissue."""

from __future__ import annotations

import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_lightning.demo.synthetic import render, sample_spec
from wsi_lightning.slides import write_pyramid_tiff

PATTERN_MPP = 0.5


def pattern(height: int, width: int) -> np.ndarray:
    """Known pattern: R = horizontal ramp, G = vertical ramp, B = 128-px checker (90 / 160).

    Returns:
        (height, width, 3) uint8.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    r = (xx + 0.5) * 255 / width
    g = (yy + 0.5) * 255 / height
    b = np.where((xx // 128 + yy // 128) % 2, 160, 90)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def box_pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Expected levels: successive 2x box reductions (what write_pyramid_tiff stores)."""
    levels = [image]
    for _ in range(n_levels - 1):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


@pytest.fixture(scope="session")
def pattern_image() -> np.ndarray:
    return pattern(1280, 1700)  # width not a multiple of the tile: partial edge tiles


@pytest.fixture(scope="session")
def pattern_slide(tmp_path_factory, pattern_image) -> Path:
    path = tmp_path_factory.mktemp("pattern") / "pattern.tiff"
    write_pyramid_tiff(path, pattern_image, PATTERN_MPP, n_levels=4)
    return path


def _split_jpeg(data: bytes) -> tuple[bytes, bytes]:
    """Split a JPEG into (tables, abbreviated image) like Aperio tiles + JPEGTables; also drops
    APP markers so the tile has no JFIF/Adobe colour hint (as in Aperio RGB files)."""
    tables, rest, i = [b"\xff\xd8"], [b"\xff\xd8"], 2
    while True:
        marker, length = struct.unpack(">HH", data[i : i + 4])
        segment = data[i : i + 2 + length]
        if marker == 0xFFDA:  # start of scan: the rest is entropy-coded data
            rest.append(data[i:])
            break
        if marker in (0xFFDB, 0xFFC4):
            tables.append(segment)
        elif not 0xFFE0 <= marker <= 0xFFEF:
            rest.append(segment)
        i += 2 + length
    return b"".join(tables) + b"\xff\xd9", b"".join(rest)


def write_svs_like(path: Path, image: np.ndarray, mpp: float, n_levels: int = 3) -> None:
    """Aperio-style SVS: raw RGB JPEG tiles (photometric RGB, no JFIF) sharing JPEGTables."""
    h0, w0 = image.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(box_pyramid(image, n_levels)):
            lh, lw = level.shape[:2]
            tiles, tables = [], None
            for y in range(0, lh, 256):
                for x in range(0, lw, 256):
                    tile = np.zeros((256, 256, 3), np.uint8)
                    part = level[y : y + 256, x : x + 256]
                    tile[: part.shape[0], : part.shape[1]] = part
                    enc = imagecodecs.jpeg8_encode(
                        tile, level=80, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1)
                    )
                    tables, abbreviated = _split_jpeg(enc)
                    tiles.append(abbreviated)
            desc = (
                f"Aperio Image Library v10.0.51\r\n{w0}x{h0} [0,0 {w0}x{h0}] (256x256) "
                f"JPEG/RGB Q=80|AppMag = 20|MPP = {mpp}"
            )
            tw.write(
                iter(tiles),
                shape=level.shape,
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                jpegtables=tables,
                compressionargs={"outcolorspace": "RGB"},
                subsampling=(1, 1),
                subfiletype=0 if i == 0 else 1,
                description=desc,
                metadata=None,
            )


@pytest.fixture(scope="session")
def svs_slide(tmp_path_factory, pattern_image) -> Path:
    path = tmp_path_factory.mktemp("svs") / "aperio_like.svs"
    write_svs_like(path, pattern_image[:1000, :1200], PATTERN_MPP)
    return path


@pytest.fixture(scope="session")
def tissue_spec():
    """A small tumour slide spec: 512 µm square."""
    return sample_spec(np.random.default_rng(7), "tumor", "tiny", size_um=512.0, mpp=0.25)


@pytest.fixture(scope="session")
def tissue_slides(tmp_path_factory, tissue_spec) -> dict[float, Path]:
    """The same tissue at 0.25 µm/px (2048 px) and 0.5 µm/px (its 2x box reduction)."""
    folder = tmp_path_factory.mktemp("tissue")
    fine, _ = render(tissue_spec)
    coarse = np.asarray(Image.fromarray(fine).reduce(2))
    paths = {0.25: folder / "fine.tiff", 0.5: folder / "coarse.tiff"}
    write_pyramid_tiff(paths[0.25], fine, 0.25, n_levels=4)
    write_pyramid_tiff(paths[0.5], coarse, 0.5, n_levels=4)
    return paths
