"""The gigapixel slide generator: an SVS-like pyramid both readers read, drawn tile by tile."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from wsi_lightning.demo.gigapixel import GigaSpec, _Fields, gigapixel_slide, write_gigapixel
from wsi_lightning.slides import SlideReader, segment_tissue

SPEC = GigaSpec(width=4096, height=3072, pieces=2)


@pytest.fixture(scope="module")
def giga(tmp_path_factory):
    return gigapixel_slide(tmp_path_factory.mktemp("giga"), SPEC, progress=False)


def test_both_readers_read_the_same_pyramid(giga):
    path, stats = giga
    fast, osr = SlideReader(path, backend="fast"), SlideReader(path, backend="openslide")
    assert fast.level_dimensions == osr.level_dimensions == [tuple(s) for s in SPEC.level_sizes()]
    assert fast.mpp == osr.mpp == 0.25 and osr.vendor == "aperio"
    assert stats["levels"] == [list(s) for s in SPEC.level_sizes()]
    for level in range(fast.level_count):
        a = fast.read_region((1000, 800), level, (300, 200))
        b = osr.read_region((1000, 800), level, (300, 200))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert 0 < stats["tissue_tiles"][0] < stats["tiles"][0]


def test_each_level_is_the_box_average_of_the_level_below(giga):
    """A coarse level shows the same slide: within JPEG error of the finer level box-averaged."""
    path, _ = giga
    with SlideReader(path) as r:
        for level in (1, 2):
            w, h = r.level_dimensions[level + 1]
            fine = r.read_region((0, 0), level, (2 * w, 2 * h)).astype(np.float32)
            coarse = r.read_region((0, 0), level + 1, (w, h)).astype(np.float32)
            boxed = fine.reshape(h, 2, w, 2, 3).mean((1, 3))
            assert np.abs(boxed - coarse).mean() < 6
            assert np.abs(boxed - coarse[::-1]).mean() > 15  # the comparison can tell slides apart


def test_tissue_segmentation_finds_the_drawn_pieces(giga):
    path, _ = giga
    with SlideReader(path) as r:
        tissue = segment_tissue(r)
    h, w = tissue.mask.shape
    yy, xx = np.meshgrid((np.arange(h) + 0.5) * tissue.mpp, (np.arange(w) + 0.5) * tissue.mpp, indexing="ij")
    truth = _Fields(SPEC).sample(xx, yy)[0] > 0  # the pieces as drawn, at the mask's pixel centres
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.9 and 0.15 < truth.mean() < 0.6


def test_written_once_and_redrawn_for_another_spec(giga, tmp_path):
    path, stats = giga
    mtime = path.stat().st_mtime_ns
    again, stats2 = gigapixel_slide(path.parent, SPEC, progress=False)
    assert again == path and path.stat().st_mtime_ns == mtime and stats2 == stats
    other, _ = gigapixel_slide(path.parent, GigaSpec(width=1024, height=768, pieces=1), progress=False)
    assert other != path and other.exists() and path.stat().st_mtime_ns == mtime


def _traced_peak_mb(path, spec: GigaSpec) -> float:
    tracemalloc.start()
    try:
        write_gigapixel(path, spec, progress=False)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_slide(tmp_path):
    """16x the area (8192 x 6144, 144 MB of RGB, vs 2048 x 1536): the same peak allocation
    (texture atlases and one tile), so the image is never held."""
    small = _traced_peak_mb(tmp_path / "small.tiff", GigaSpec(width=2048, height=1536, pieces=3))
    large = _traced_peak_mb(tmp_path / "large.tiff", GigaSpec(width=8192, height=6144, pieces=3))
    assert large - small < 8, f"peak {large:.0f} MB vs {small:.0f} MB"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary files were renamed into place


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        GigaSpec(width=4096, height=3072, tile=250)
