"""Rendering helpers: normalisations on known vectors, exact tile painting, figure files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_lightning.analysis import viz
from wsi_lightning.slides.annotations import load_lesions


def test_raw_keeps_values_and_nan():
    v = np.array([0.1, np.nan, 0.6, 0.3])
    out = viz.normalise(v, "raw")
    np.testing.assert_allclose(out[[0, 2, 3]], [0.1, 0.6, 0.3])
    assert np.isnan(out[1])


def test_softmax_sums_to_one_and_keeps_order():
    v = np.array([1.0, 3.0, 2.0, np.nan])
    out = viz.normalise(v, "softmax")
    e = np.exp([1.0, 3.0, 2.0])
    np.testing.assert_allclose(out[:3], e / e.sum())
    assert np.nansum(out) == pytest.approx(1.0) and np.isnan(out[3])
    big = viz.normalise(np.array([1000.0, 1001.0]), "softmax")  # no overflow
    assert np.isfinite(big).all() and big.sum() == pytest.approx(1.0)


def test_minmax_ends_at_zero_and_one():
    out = viz.normalise(np.array([2.0, 4.0, 3.0, 10.0]), "minmax")
    np.testing.assert_allclose(out, [0.0, 0.25, 0.125, 1.0])
    np.testing.assert_allclose(viz.normalise(np.full(3, 7.0), "minmax"), 0.5)


def test_percentile_is_rank_based_and_robust_to_outliers():
    v = np.array([0.2, 0.1, 1e6, 0.3, 0.25])
    out = viz.normalise(v, "percentile")
    np.testing.assert_allclose(out, [1 / 4, 0.0, 1.0, 3 / 4, 2 / 4])
    # a monotone transform (and the outlier's size) changes nothing
    np.testing.assert_allclose(viz.normalise(np.log(v), "percentile"), out)
    ties = viz.normalise(np.array([1.0, 2.0, 2.0, 3.0]), "percentile")
    np.testing.assert_allclose(ties, [0.0, 0.5, 0.5, 1.0])
    assert viz.normalise(np.array([5.0]), "percentile")[0] == 0.5


def test_normalise_rejects_unknown_mode():
    with pytest.raises(ValueError, match="expected one of .*percentile"):
        viz.normalise(np.ones(3), "zscore")


def test_display_range():
    assert viz.display_range(np.array([0.2, 0.9]), "percentile") == (0.0, 1.0)
    assert viz.display_range(np.array([0.1, 0.4, np.nan]), "raw") == (0.0, pytest.approx(0.4))
    assert viz.display_range(np.array([-1.0, -2.0]), "raw") == (0.0, 1.0)
    np.testing.assert_allclose(viz.to_unit(np.array([-1.0, 0.2, 0.8]), 0.0, 0.4), [0.0, 0.5, 1.0])


def test_tile_heatmap_paints_exactly_the_tile_square():
    thumb = np.full((40, 50, 3), 200, np.uint8)
    # scale 0.25: the tile at level-0 (64, 32) of side 64 covers thumbnail x 16..32, y 8..24
    out = viz.tile_heatmap(np.array([1.0, np.nan]), np.array([[64, 32], [0, 0]]), 64, thumb, 0.25)
    changed = (out != thumb).any(-1)
    expected = np.zeros((40, 50), bool)
    expected[8:24, 16:32] = True
    np.testing.assert_array_equal(changed, expected)
    # value 1 of jet is dark red (0.5, 0, 0), blended half and half with grey 200
    np.testing.assert_array_equal(out[10, 20], [164, 100, 100])
    assert out.dtype == np.uint8 and out.shape == thumb.shape


def test_tile_heatmap_dense_grid_has_no_gaps_and_clips_at_the_edge():
    thumb = np.zeros((30, 30, 3), np.uint8)
    xs, ys = np.meshgrid(np.arange(4) * 100, np.arange(4) * 100)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)  # 4 x 4 tiles of 100 px, scale 0.09
    out = viz.tile_heatmap(np.linspace(0, 1, 16), coords, 100, thumb, 0.09, cmap="viridis", alpha=1.0)
    assert (out[:30, :30] != 0).any(-1).all(), "a dense grid covers the thumbnail without gaps"
    with pytest.raises(ValueError, match="3 values but 2 coords"):
        viz.tile_heatmap(np.ones(3), np.zeros((2, 2)), 10, thumb, 1.0)


def test_load_and_draw_polygons(tmp_path: Path):
    ring = [[10, 10], [50, 10], [50, 40], [10, 10]]
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}}]}
    (tmp_path / "a.geojson").write_text(json.dumps(doc))
    polys = [les.exterior for les in load_lesions(tmp_path / "a.geojson")]
    assert len(polys) == 1 and polys[0].shape == (4, 2)
    img = np.full((30, 30, 3), 255, np.uint8)
    drawn = viz.draw_polygons(img, polys, 0.5, color=(0, 0, 0))
    assert drawn[5, 15].tolist() == [0, 0, 0] and (img == 255).all()  # a copy, outlined


def test_figures_are_written_as_png(tmp_path: Path):
    thumb = np.full((60, 80, 3), 230, np.uint8)
    overlay = viz.tile_heatmap(np.array([0.3]), np.array([[0, 0]]), 100, thumb, 0.2)
    poly = [np.array([[10.0, 10.0], [200.0, 10.0], [200.0, 200.0]])]
    p = viz.save_heatmap_figure(tmp_path / "h.png", thumb, overlay, "slide", "attention", 0, 0.5,
                                polygons_level0=poly, thumb_scale=0.2)
    m = viz.tile_montage([np.zeros((16, 16, 3), np.uint8)] * 3, ["a", "b", "c"], 2, tmp_path / "m.png")
    for path in (p, m):
        assert Image.open(path).format == "PNG"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["h.png", "m.png"], "no temp files left"
    with pytest.raises(ValueError, match="2 tiles but 1 labels"):
        viz.tile_montage([thumb, thumb], ["x"], 2, tmp_path / "bad.png")


def test_tile_rgba_is_the_heatmap_colour_on_a_transparent_layer():
    coords, values = np.array([[64, 32], [0, 0], [128, 0]]), np.array([1.0, np.nan, 0.0])
    rgba = viz.tile_rgba(values, coords, 64, (40, 50), 0.25)
    assert rgba.shape == (40, 50, 4) and rgba.dtype == np.uint8
    opaque = np.zeros((40, 50), bool)
    opaque[8:24, 16:32] = opaque[0:16, 32:48] = True  # the NaN tile is left transparent
    np.testing.assert_array_equal(rgba[..., 3] == 255, opaque)
    assert (rgba[~opaque] == 0).all()
    np.testing.assert_array_equal(rgba[10, 20, :3], [128, 0, 0])  # jet(1): dark red
    np.testing.assert_array_equal(rgba[4, 40, :3], [0, 0, 128])  # jet(0): dark blue
    same = viz.tile_heatmap(values, coords, 64, np.zeros((40, 50, 3), np.uint8), 0.25, alpha=1.0)
    np.testing.assert_array_equal(same[opaque], rgba[opaque][:, :3])
