"""SlideReader: geometry, pixels at every level and mpp, fast path == OpenSlide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from tests.slides.conftest import PATTERN_MPP, box_pyramid
from wsi_lightning.slides import SlideReader

BACKENDS = ["fast", "openslide"]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometry_and_properties(pattern_slide, pattern_image, backend):
    with SlideReader(pattern_slide, backend=backend) as reader:
        assert reader.backend == backend
        h, w = pattern_image.shape[:2]
        assert reader.dimensions == (w, h)
        assert reader.level_count == 4
        assert reader.level_dimensions == [(1700, 1280), (850, 640), (425, 320), (213, 160)]
        assert reader.level_downsamples[:3] == [1.0, 2.0, 4.0]
        assert reader.level_downsamples[3] == pytest.approx(8.0, rel=0.01)
        assert reader.mpp == pytest.approx(PATTERN_MPP)
        assert reader.level_mpp(2) == pytest.approx(4 * PATTERN_MPP)
        assert reader.vendor == "aperio"
        assert reader.objective_power == 20
        assert reader.properties["openslide.mpp-x"] == "0.5"


def test_auto_picks_fast_path(pattern_slide):
    with SlideReader(pattern_slide) as reader:
        assert reader.backend == "fast"


def _away_from_edges(shape: tuple[int, int], square: float, margin: int = 3) -> np.ndarray:
    """(h, w) bool: pixels at least `margin` px from the checker's edges and the image border
    (JPEG 4:2:0 rings there by design)."""
    h, w = shape

    def ok(n):
        c = np.arange(n) + 0.5
        return (
            (np.abs(c - np.round(c / square) * square) >= margin)
            & (c >= margin)
            & (c <= n - margin)
        )

    return ok(h)[:, None] & ok(w)[None, :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_level_matches_the_written_pyramid(pattern_slide, pattern_image, backend):
    with SlideReader(pattern_slide, backend=backend) as reader:
        for level, expected in enumerate(box_pyramid(pattern_image, 4)):
            h, w = expected.shape[:2]
            got = reader.read_region((0, 0), level, (w, h))
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            d = _diff(got, expected)
            assert d.mean() < 1 + level, f"level {level}"  # edges grow relative to squares
            inner = d[_away_from_edges((h, w), 128 / 2**level)]
            assert inner.mean() < 1.2 and inner.max() <= 12, f"level {level}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_values_and_white_outside(pattern_slide, backend):
    with SlideReader(pattern_slide, backend=backend) as reader:
        # centres of checker squares (0, 0) and (1, 0): R ramp, G ramp, B = 90 / 160
        for x, y, blue in [(64, 64, 90), (192, 64, 160)]:
            px = reader.read_region((x, y), 0, (1, 1))[0, 0].astype(int)
            ramp = [round((x + 0.5) * 255 / 1700), round((y + 0.5) * 255 / 1280), blue]
            assert np.abs(px - ramp).max() <= 3
            # the same point at level 2 (a 4x4 box average around it)
            px = reader.read_region((x, y), 2, (1, 1))[0, 0].astype(int)
            assert np.abs(px - ramp).max() <= 3
        out = reader.read_region((1650, 1250), 1, (100, 60))  # level 1 covers x < 1700
        assert (out[:, 25:] == 255).all() and (out[15:, :] == 255).all()
        assert (out[:10, :20] < 250).any()
        assert (reader.read_region((-500, -500), 0, (100, 100)) == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_at_mpp(pattern_slide, pattern_image, backend):
    with SlideReader(pattern_slide, backend=backend) as reader:
        assert reader.best_level_for_mpp(0.25) == 0
        assert reader.best_level_for_mpp(0.5) == 0
        assert reader.best_level_for_mpp(0.999) == 1  # within 1% of level 1's 1.0
        assert reader.best_level_for_mpp(1.5) == 1
        assert reader.best_level_for_mpp(100) == 3
        # an exact level: no resampling, identical to read_region
        exact = reader.read_at_mpp((256, 128), (200, 100), 1.0)
        np.testing.assert_array_equal(exact, reader.read_region((256, 128), 1, (200, 100)))
        # 1.5 µm/px: 3x the level-0 pixel; compare with a 3x box reduction of the source
        got = reader.read_at_mpp((192, 96), (120, 80), 1.5)
        src = pattern_image[96 : 96 + 240, 192 : 192 + 360]
        expected = np.asarray(Image.fromarray(src).reduce(3))
        assert got.shape == (80, 120, 3)
        assert _diff(got, expected)[..., :2].mean() < 1.5
        # finer than level 0: upsampled, covering size * 0.25 / 0.5 level-0 pixels
        fine = reader.read_at_mpp((400, 400), (64, 64), 0.25)
        assert fine.shape == (64, 64, 3)
        assert _diff(fine[::2, ::2], pattern_image[400:432, 400:432])[..., :2].mean() < 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail(pattern_slide, backend):
    with SlideReader(pattern_slide, backend=backend) as reader:
        thumb, mpp = reader.thumbnail(mpp=8.0)
        assert mpp == 8.0
        assert thumb.shape == (80, 107, 3)  # ceil(1280 * 0.5 / 8), ceil(1700 * 0.5 / 8)
        thumb, mpp = reader.thumbnail(max_size=100)
        assert max(thumb.shape[:2]) == 100 and mpp == pytest.approx(1700 * 0.5 / 100)


def _random_regions(rng, reader, n):
    w0, h0 = reader.dimensions
    for _ in range(n):
        level = int(rng.integers(reader.level_count))
        ds = reader.level_downsamples[level]
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        x = int(rng.integers(-w * ds, w0 + 50))
        y = int(rng.integers(-h * ds, h0 + 50))
        yield (x, y), level, (w, h)


@pytest.mark.parametrize("slide", ["pattern_slide", "svs_slide", "tissue_slides"])
def test_fast_path_equals_openslide(slide, request):
    path = request.getfixturevalue(slide)
    path = path[0.25] if isinstance(path, dict) else path
    fast, osl = SlideReader(path, backend="fast"), SlideReader(path, backend="openslide")
    assert fast.level_dimensions == osl.level_dimensions
    assert fast.level_downsamples == osl.level_downsamples
    assert fast.properties == osl.properties
    rng = np.random.default_rng(0)
    diffs = []
    for loc, level, size in _random_regions(rng, fast, 120):
        d = _diff(fast.read_region(loc, level, size), osl.read_region(loc, level, size))
        # sub-pixel positions are resampled bilinearly by both (cairo uses 7-bit weights)
        assert d.max() <= 6, (loc, level, size)
        diffs.append(d.mean())
    assert np.mean(diffs) < 0.5
    for level in range(fast.level_count):  # tile-aligned reads decode identically
        ds = fast.level_downsamples[level]
        loc = (round(256 * ds), 0) if fast.level_dimensions[level][0] > 512 else (0, 0)
        d = _diff(fast.read_region(loc, level, (256, 256)), osl.read_region(loc, level, (256, 256)))
        assert d.max() <= 1
    fast.close()
    osl.close()


def test_svs_like_is_read_by_the_fast_path(svs_slide, pattern_image):
    with SlideReader(svs_slide) as reader:
        assert reader.backend == "fast" and reader.vendor == "aperio"
        lv = reader._fast.levels[0]
        assert lv.tables is not None and lv.colorspace == 2  # JPEGTables, raw RGB (JCS_RGB)
        got = reader.read_region((0, 0), 0, (1200, 1000))
        assert _diff(got, pattern_image[:1000, :1200]).mean() < 1.5


def test_generic_tiff_vendor(tmp_path, pattern_image):
    from wsi_lightning.slides import write_pyramid_tiff

    path = tmp_path / "generic.tiff"
    write_pyramid_tiff(path, pattern_image[:600, :700], 0.25, n_levels=3, aperio=False)
    with SlideReader(path) as reader:
        assert reader.vendor == "generic-tiff" and reader.backend == "fast"
        assert reader.mpp == pytest.approx(0.25)
        assert reader.objective_power is None
        assert reader.level_dimensions == [(700, 600), (350, 300), (175, 150)]


def test_pickle_reopens(pattern_slide):
    reader = SlideReader(pattern_slide, mpp=0.6)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone is not reader and clone.mpp == 0.6 and clone.backend == reader.backend
    np.testing.assert_array_equal(
        clone.read_region((10, 10), 0, (32, 32)), reader.read_region((10, 10), 0, (32, 32))
    )
