"""Errors name the file and say how to fix the problem."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from wsi_lightning.errors import ConfigError, NoTissueError, SlideError
from wsi_lightning.slides import SlideReader, segment_tissue, tile_slide, write_pyramid_tiff

BACKENDS = ["auto", "openslide"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    path = tmp_path / "nowhere.svs"
    with pytest.raises(SlideError, match="file not found") as err:
        SlideReader(path, backend=backend)
    assert str(path) in str(err.value) and "manifest" in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file(tmp_path, pattern_image, backend):
    path = tmp_path / "cut.tiff"
    write_pyramid_tiff(path, pattern_image, 0.5)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(SlideError) as err:
        SlideReader(path, backend=backend)
    msg = str(err.value)
    assert f"cannot open slide {path}" in msg and "re-download" in msg


def test_truncated_tail_is_caught_by_the_fast_path(tmp_path, pattern_image):
    """Cutting only the last bytes keeps every IFD readable; the tile table gives it away."""
    path = tmp_path / "tail.tiff"
    write_pyramid_tiff(path, pattern_image, 0.5, n_levels=1)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    try:
        reader = SlideReader(path)
    except SlideError as err:
        assert str(path) in str(err) and "re-download" in str(err)
    else:  # OpenSlide opened it: then the fast path must not have silently accepted it
        pytest.fail(f"truncated slide opened with backend {reader.backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_slide(tmp_path, backend):
    path = tmp_path / "notes.svs"
    path.write_text("these are not the pixels you are looking for")
    with pytest.raises(SlideError, match="not a whole-slide image") as err:
        SlideReader(path, backend=backend)
    assert str(path) in str(err.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(SlideError, match="folder"):
        SlideReader(tmp_path)


def _write_plain_tiff(path, image):
    """Tiled JPEG TIFF without resolution or description: nobody knows its mpp."""
    tifffile.imwrite(
        path, image, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mpp(tmp_path, pattern_image, backend):
    path = tmp_path / "nompp.tiff"
    _write_plain_tiff(path, pattern_image[:512, :512])
    reader = SlideReader(path, backend=backend)  # opening works; mpp is needed later
    with pytest.raises(SlideError, match="add an 'mpp' column to the manifest") as err:
        _ = reader.mpp
    assert str(path) in str(err.value)
    with pytest.raises(SlideError, match="'mpp' column"):
        reader.read_at_mpp((0, 0), (16, 16), 1.0)
    fixed = SlideReader(path, mpp=0.5, backend=backend)
    assert fixed.mpp == 0.5
    assert fixed.read_at_mpp((0, 0), (16, 16), 1.0).shape == (16, 16, 3)


def test_bad_mpp_override_and_backend(pattern_slide):
    with pytest.raises(SlideError, match="'mpp' column"):
        SlideReader(pattern_slide, mpp=-1)
    with pytest.raises(ConfigError, match="expected one of"):
        SlideReader(pattern_slide, backend="tiffslide")


def test_fast_backend_refuses_non_jpeg(tmp_path, pattern_image):
    path = tmp_path / "deflate.tiff"
    tifffile.imwrite(
        path,
        pattern_image[:512, :512],
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    assert SlideReader(path).backend == "openslide"  # auto falls back
    with pytest.raises(SlideError, match="fast path cannot read") as err:
        SlideReader(path, backend="fast")
    assert str(path) in str(err.value) and "backend='auto'" in str(err.value)


def test_bad_level(pattern_slide):
    with SlideReader(pattern_slide) as reader, pytest.raises(SlideError, match="levels 0..3"):
        reader.read_region((0, 0), 7, (8, 8))


def test_closed_reader(pattern_slide):
    reader = SlideReader(pattern_slide, backend="openslide")
    reader.close()
    with pytest.raises(SlideError, match="closed"):
        reader.read_region((0, 0), 0, (8, 8))


def test_blank_slide_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tiff"
    rng = np.random.default_rng(0)
    glass = (244 + rng.integers(-3, 4, (1024, 1024, 3))).astype(np.uint8)
    write_pyramid_tiff(path, glass, 0.5)
    reader = SlideReader(path)
    with pytest.raises(NoTissueError, match="no tissue found") as err:
        segment_tissue(reader)
    assert str(path) in str(err.value) and "min_saturation" in str(err.value)
    with pytest.raises(NoTissueError):
        tile_slide(reader, 64, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile(tmp_path, pattern_image, backend):
    path = tmp_path / "corrupt.tiff"
    write_pyramid_tiff(path, pattern_image[:1024, :1024], 0.5)
    page = tifffile.TiffFile(path).pages[0]
    with open(path, "r+b") as fh:  # zero the bytes of level-0 tile (1, 1)
        fh.seek(page.dataoffsets[5])
        fh.write(b"\0" * page.databytecounts[5])
    reader = SlideReader(path, backend=backend)
    assert reader.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)  # tile (0, 0) is fine
    with pytest.raises(SlideError, match="re-download") as err:
        reader.read_region((256, 256), 0, (256, 256))
    assert str(path) in str(err.value)
