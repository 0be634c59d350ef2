"""Tissue masks and tiling by physical size."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_lightning.slides import SlideReader, save_tissue_png, segment_tissue, tile_slide
from wsi_lightning.slides.tissue import TissueMask, otsu_threshold


def _is_tissue(rgb: np.ndarray) -> np.ndarray:
    """Ground truth for rendered slides: glass is bright and grey. Returns (h, w) bool."""
    rgb = rgb.astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1) > 25) | (rgb.mean(-1) < 200)


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(40, 5, 1000), rng.normal(180, 5, 3000)])
    t = otsu_threshold(values)
    assert 60 < t < 160
    np.testing.assert_array_equal(values > t, np.arange(4000) >= 1000)


def test_fraction_is_exact_area():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    tissue = TissueMask(mask=mask, mpp=8.0, thumbnail=np.zeros((10, 10, 3), np.uint8))
    # level-0 at 2 µm/px: one mask pixel = 4 level-0 pixels
    assert tissue.fraction(8, 8, 16, 16, 2.0) == pytest.approx(1.0)
    assert tissue.fraction(4, 8, 16, 16, 2.0) == pytest.approx(0.75)  # 1 of 4 columns off
    assert tissue.fraction(6, 8, 4, 4, 2.0) == pytest.approx(0.5)  # half a mask pixel in
    assert tissue.fraction(-100, -100, 50, 50, 2.0) == 0.0
    boxes = np.array([[8, 8, 16, 16], [4, 8, 16, 16]])
    np.testing.assert_allclose(tissue.fractions(boxes, 2.0), [1.0, 0.75])


def test_segment_tissue_matches_rendered_tissue(tissue_slides, tmp_path):
    reader = SlideReader(tissue_slides[0.5])
    tissue = segment_tissue(reader)
    assert tissue.mpp == 8.0 and tissue.mask.shape == tissue.thumbnail.shape[:2]
    truth = _is_tissue(reader.thumbnail(mpp=8.0)[0])
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.85
    save_tissue_png(tissue, tmp_path / "check.png")
    assert (tmp_path / "check.png").stat().st_size > 0


def test_tiles_have_physical_size_and_sit_on_tissue(tissue_slides):
    fine, coarse = SlideReader(tissue_slides[0.25]), SlideReader(tissue_slides[0.5])
    grid_f = tile_slide(fine, 64, 0.5)
    grid_c = tile_slide(coarse, 64, 0.5)
    assert grid_f.extent_level0 == 128 and grid_c.extent_level0 == 64
    assert grid_f.tile_size_um == grid_c.tile_size_um == 32.0
    assert grid_f.level == 1 and grid_c.level == 0
    assert grid_f.coords.dtype == np.int64 and grid_f.coords.shape[1] == 2
    assert (grid_f.coords % 128 == 0).all()
    assert (grid_f.tissue_fraction >= 0.5).all()
    # same tissue in microns (each slide with its own mask: boundary tiles may differ)
    um_f = {tuple(c) for c in (grid_f.coords * 0.25).tolist()}
    um_c = {tuple(c) for c in (grid_c.coords * 0.5).tolist()}
    assert len(um_f & um_c) / len(um_f | um_c) > 0.95
    # with one shared mask the grids are identical in microns
    tissue = segment_tissue(coarse)
    np.testing.assert_array_equal(
        tile_slide(fine, 64, 0.5, tissue=tissue).coords * 0.25,
        tile_slide(coarse, 64, 0.5, tissue=tissue).coords * 0.5,
    )
    # tiles read at 0.5 µm/px from both slides show the same pixels
    for i in range(0, len(grid_c), max(1, len(grid_c) // 10)):
        x, y = grid_c.coords[i]
        a = grid_c.read_tile(coarse, i)
        b = fine.read_at_mpp((int(2 * x), int(2 * y)), (64, 64), 0.5)
        assert a.shape == b.shape == (64, 64, 3)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 6


def test_tiles_cover_tissue_and_avoid_glass(tissue_slides):
    reader = SlideReader(tissue_slides[0.5])
    grid = tile_slide(reader, 64, 0.5, min_tissue=0.5)
    w, h = reader.dimensions
    image = reader.read_region((0, 0), 0, (w, h))
    truth = _is_tissue(image)
    covered = np.zeros_like(truth)
    for x, y in grid.coords:
        tile = truth[y : y + 64, x : x + 64]
        assert tile.mean() > 0.3, "tile on glass"
        covered[y : y + 64, x : x + 64] = True
    assert (covered & truth).sum() / truth.sum() > 0.85  # boundary tiles < 50% are dropped


def test_stride_and_all_tiles(tissue_slides):
    reader = SlideReader(tissue_slides[0.5])
    dense = tile_slide(reader, 64, 0.5, min_tissue=0.0, stride=32)
    w, h = reader.dimensions
    assert len(dense) == int(np.ceil(w / 32)) * int(np.ceil(h / 32))
    assert set(np.unique(dense.coords[:, 0]) % 32) == {0}
