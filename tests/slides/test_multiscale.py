"""Concentric (CS-MIL) and quadtree (HAG-MIL) windows: geometry in level-0 px, physical sizes,
padding past the slide edge, serialisation, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_lightning.errors import ConfigError, NoTissueError, StoreError
from wsi_lightning.slides import SlideReader, segment_tissue, write_pyramid_tiff
from wsi_lightning.slides.multiscale import (
    CHILD_OFFSETS,
    ConcentricGrid,
    QuadtreeGrid,
    concentric_grid,
    quadtree_grid,
    read_window,
)

# fine slide: 1440 x 2048 px at 0.25 µm/px = 360 x 512 µm; tissue band y in [64, 448) µm spans
# the full width, so it touches the left and right borders
FINE_W, FINE_H, BAND_UM = 1440, 2048, (64.0, 448.0)


def _band_image(mpp: float = 0.25) -> np.ndarray:
    """Textured pink tissue band on white glass (texture periods in microns). Returns (H, W, 3)."""
    yy, xx = np.mgrid[0:FINE_H, 0:FINE_W] * mpp  # microns
    r = 205 + 30 * np.sin(2 * np.pi * xx / 97) * np.cos(2 * np.pi * yy / 71)
    g = 110 + 45 * np.sin(2 * np.pi * (xx + 2 * yy) / 131)
    b = 165 + 35 * np.cos(2 * np.pi * (xx - yy) / 83)
    tissue = np.stack([r, g, b], -1)
    inside = ((yy >= BAND_UM[0]) & (yy < BAND_UM[1]))[..., None]
    return np.where(inside, tissue, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def band_slides(tmp_path_factory) -> dict[float, SlideReader]:
    """The same band at 0.25 µm/px (1440 x 2048) and 0.5 µm/px (its 2x box reduction)."""
    folder = tmp_path_factory.mktemp("band")
    fine = _band_image()
    coarse = np.asarray(Image.fromarray(fine).reduce(2))
    write_pyramid_tiff(folder / "fine.tiff", fine, 0.25, n_levels=5)
    write_pyramid_tiff(folder / "coarse.tiff", coarse, 0.5, n_levels=4)
    return {0.25: SlideReader(folder / "fine.tiff"), 0.5: SlideReader(folder / "coarse.tiff")}


@pytest.fixture(scope="module")
def band_tissue(band_slides):
    return segment_tissue(band_slides[0.5])


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _reduce(img: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).reduce(k))


# -- concentric ---------------------------------------------------------------------------------
def test_concentric_windows_share_centres_and_scale(band_slides, band_tissue):
    grid = concentric_grid(band_slides[0.5], 64, 1.0, context=(1, 2, 4), tissue=band_tissue)
    n = len(grid)
    assert grid.centres.shape == (n, 2) and grid.centres.dtype == np.float64
    assert grid.boxes.shape == (n, 3, 4) and grid.boxes.dtype == np.int64
    np.testing.assert_array_equal(
        grid.boxes[..., :2] + grid.boxes[..., 2:] / 2, grid.centres[:, None].repeat(3, 1)
    )
    np.testing.assert_array_equal(grid.boxes[0, :, 2], [128, 256, 512])  # f * extent_level0
    assert (grid.boxes[..., 2] == grid.boxes[..., 3]).all()
    np.testing.assert_allclose(grid.scale_mpp, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(grid.window_um, [64.0, 128.0, 256.0])
    assert grid.out_size == 64 and grid.slide_mpp == 0.5 and grid.base_mpp == 1.0
    assert (grid.tissue_fraction >= 0.5).all()


def test_concentric_same_windows_in_microns_across_scanners(band_slides, band_tissue):
    fine = concentric_grid(band_slides[0.25], 64, 1.0, tissue=band_tissue)
    coarse = concentric_grid(band_slides[0.5], 64, 1.0, tissue=band_tissue)
    np.testing.assert_array_equal(fine.boxes, 2 * coarse.boxes)
    np.testing.assert_array_equal(fine.centres * 0.25, coarse.centres * 0.5)
    np.testing.assert_array_equal(fine.window_um, coarse.window_um)
    np.testing.assert_array_equal(fine.scale_mpp, coarse.scale_mpp)
    for i in (0, len(fine) // 2, len(fine) - 1):
        a, b = fine.read(band_slides[0.25], i), coarse.read(band_slides[0.5], i)
        assert a.shape == b.shape == (3, 64, 64, 3) and a.dtype == np.uint8
        assert _diff(a, b) < 6


def test_concentric_context_content_matches_base_tile(band_slides, band_tissue):
    reader = band_slides[0.5]
    grid = concentric_grid(reader, 64, 1.0, context=(1, 2, 4), tissue=band_tissue)
    inside = np.flatnonzero(
        (grid.boxes[:, 2, :2] >= 0).all(1) & (grid.boxes[:, 2, :2] + 512 <= [720, 1024]).all(1)
    )
    assert len(inside)
    for i in inside[:3]:
        s1, s2, s4 = grid.read(reader, i)
        assert _diff(s2[16:48, 16:48], _reduce(s1, 2)) < 6  # base tile = centre half of scale 2
        assert _diff(s4[24:40, 24:40], _reduce(s1, 4)) < 6  # and the centre quarter of scale 4
        assert _diff(s4[16:48, 16:48], _reduce(s2, 2)) < 6
        assert _diff(s2[16:48, 16:48], _reduce(s1, 2)[::-1]) > 10  # the check has teeth


def test_concentric_odd_extent_stays_centred(band_slides, band_tissue):
    grid = concentric_grid(band_slides[0.5], 63, 0.5, context=(1, 2, 3.5), tissue=band_tissue)
    extent = 63
    np.testing.assert_array_equal(
        grid.boxes[..., :2] + grid.boxes[..., 2:] / 2, grid.centres[:, None].repeat(3, 1)
    )
    assert (np.abs(grid.boxes[0, :, 2] - np.array([1, 2, 3.5]) * extent) <= 1).all()


def test_concentric_windows_past_the_edge_are_kept_and_padded(band_slides, band_tissue):
    reader = band_slides[0.5]
    width, height = reader.dimensions
    grid = concentric_grid(reader, 64, 1.0, context=(1, 2, 4), tissue=band_tissue)
    base = concentric_grid(reader, 64, 1.0, context=(1,), tissue=band_tissue)
    np.testing.assert_array_equal(grid.boxes[:, :1], base.boxes)  # no tile dropped for context
    left = np.flatnonzero(grid.boxes[:, 2, 0] < 0)
    right = np.flatnonzero(grid.boxes[:, 2, 0] + grid.boxes[:, 2, 2] > width)
    assert len(left) and len(right)
    assert (grid.boxes[left, 2, 2] == 512).all()  # full box recorded, not clipped
    # scale 4: 64 px at 4 µm/px = 8 level-0 px per output px; box x0 = -192 -> 24 padded columns
    i = left[0]
    assert grid.boxes[i, 2, 0] == -192
    pad = _off_slide(grid.boxes[i, 2], 64, 8, width, height)
    assert pad[:, :24].all() and not pad[:, 24:].all(0).any()
    white, black = grid.read(reader, i), grid.read(reader, i, pad_value=0)
    assert (white[2][pad] == 255).all() and (black[2][pad] == 0).all()
    np.testing.assert_array_equal(white[2][~pad], black[2][~pad])
    assert white[2][~pad].std() > 10  # tissue inside
    raw = reader.read_at_mpp(tuple(grid.boxes[i, 2, :2]), (64, 64), 4.0)
    assert (raw[:, :23] == 255).all()  # the reader's own padding is white too
    # right edge: pixels whose centre lies past the slide take the pad value
    j = right[-1]
    pad = _off_slide(grid.boxes[j, 2], 64, 8, width, height)
    assert pad[:, -1].all()
    img = grid.read(reader, j, pad_value=(10, 20, 30))[2]
    assert (img[pad] == [10, 20, 30]).all()
    assert not (img[~pad] == [10, 20, 30]).all(-1).any()


def _off_slide(box: np.ndarray, size: int, step: float, width: int, height: int) -> np.ndarray:
    """(size, size) bool: output pixels of a window at level-0 `box` whose centre is off the
    slide (`step` level-0 px per output px)."""
    centre = (np.arange(size) + 0.5) * step
    off_y = (box[1] + centre < 0) | (box[1] + centre >= height)
    off_x = (box[0] + centre < 0) | (box[0] + centre >= width)
    return off_y[:, None] | off_x[None, :]


# -- quadtree -----------------------------------------------------------------------------------
def _check_tree(grid: QuadtreeGrid) -> None:
    """Children lie inside their parents at their HAG-MIL offset; children() agrees with parent."""
    for lvl in range(1, grid.n_levels):
        s = grid.extent_level0[lvl]
        assert grid.extent_level0[lvl - 1] == 2 * s
        par = grid.parent[lvl]
        offset = grid.coords[lvl] - grid.coords[lvl - 1][par]
        np.testing.assert_array_equal(offset, CHILD_OFFSETS[grid.quadrant[lvl]] * s)
        pbox, cbox = grid.boxes(lvl - 1)[par], grid.boxes(lvl)
        assert (cbox[:, :2] >= pbox[:, :2]).all()
        assert (cbox[:, :2] + cbox[:, 2:] <= pbox[:, :2] + pbox[:, 2:]).all()
        for p in range(len(grid.coords[lvl - 1])):
            kids = grid.children(lvl - 1, p)
            np.testing.assert_array_equal(kids, np.flatnonzero(par == p))
            assert (np.diff(grid.quadrant[lvl][kids]) > 0).all()  # HAG-MIL order
        table = grid.child_table(lvl - 1)
        for p in range(len(table)):
            np.testing.assert_array_equal(table[p][table[p] >= 0], grid.children(lvl - 1, p))


def test_quadtree_structure_and_hag_mil_order(band_slides, band_tissue):
    reader = band_slides[0.5]
    grid = quadtree_grid(reader, 64, (4.0, 2.0, 1.0), min_tissue=0.25, tissue=band_tissue)
    assert grid.extent_level0 == (512, 256, 128) and grid.mpp == (4.0, 2.0, 1.0)
    assert grid.window_um == (256.0, 128.0, 64.0)
    n0 = len(grid.coords[0])
    assert [len(c) for c in grid.coords] == [n0, 4 * n0, 16 * n0]  # HAG-MIL keeps all 4
    assert (grid.parent[0] == -1).all()
    np.testing.assert_array_equal(grid.parent[1], np.repeat(np.arange(n0), 4))
    x, y = grid.coords[0][0]
    np.testing.assert_array_equal(
        grid.coords[1][grid.children(0, 0)],
        [[x, y], [x, y + 256], [x + 256, y], [x + 256, y + 256]],
    )
    _check_tree(grid)
    assert all(c.dtype == np.int64 for c in grid.coords + grid.parent)
    img = grid.read(reader, 2, 5)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # a level-2 tile equals the matching quarter of its level-1 parent read at the finer mpp
    child = grid.children(1, 3)[0]
    assert _diff(_reduce(grid.read(reader, 2, child), 2), grid.read(reader, 1, 3)[:32, :32]) < 6


def test_quadtree_same_in_microns_across_scanners(band_slides, band_tissue):
    for min_child in (None, 0.6):
        fine = quadtree_grid(band_slides[0.25], 64, (4.0, 2.0, 1.0), 0.25, band_tissue, min_child)
        coarse = quadtree_grid(band_slides[0.5], 64, (4.0, 2.0, 1.0), 0.25, band_tissue, min_child)
        assert fine.extent_level0 == (1024, 512, 256) and fine.window_um == coarse.window_um
        for lvl in range(3):
            np.testing.assert_array_equal(fine.coords[lvl] * 0.25, coarse.coords[lvl] * 0.5)
            np.testing.assert_array_equal(fine.parent[lvl], coarse.parent[lvl])
        assert _diff(fine.read(band_slides[0.25], 2, 7), coarse.read(band_slides[0.5], 2, 7)) < 6


def test_quadtree_children_past_the_edge_are_kept_padded_or_dropped(band_slides, band_tissue):
    reader = band_slides[0.5]  # 720 px wide: coarse tiles at x = 0 and 512 (512..1024)
    width = reader.dimensions[0]
    grid = quadtree_grid(reader, 64, (4.0, 2.0, 1.0), min_tissue=0.25, tissue=band_tissue)
    outside = np.flatnonzero(grid.coords[1][:, 0] >= width)  # children entirely past the edge
    assert len(outside) and (grid.tissue_fraction[1][outside] == 0).all()
    for i in outside[:2]:
        assert (grid.read(reader, 1, i) == 255).all()
        assert (grid.read(reader, 1, i, pad_value=7) == 7).all()
    straddle = np.flatnonzero(grid.coords[2][:, 0] + 128 > width)
    straddle = straddle[grid.coords[2][straddle, 0] < width]
    img = grid.read(reader, 2, straddle[0], pad_value=0)  # 1 µm/px: 2 level-0 px per output px
    pad = _off_slide(grid.boxes(2)[straddle[0]], 64, 2, *reader.dimensions)
    assert pad.any() and (img[pad] == 0).all() and (img[~pad] > 0).all()
    # min_child_tissue drops them, with their subtrees, and keeps parent indices consistent
    pruned = quadtree_grid(reader, 64, (4.0, 2.0, 1.0), 0.25, band_tissue, min_child_tissue=0.5)
    _check_tree(pruned)
    np.testing.assert_array_equal(pruned.coords[0], grid.coords[0])
    for lvl in (1, 2):
        assert (pruned.tissue_fraction[lvl] >= 0.5).all()
        assert 0 < len(pruned.coords[lvl]) < len(grid.coords[lvl])
        assert (pruned.coords[lvl][:, 0] < width).all()
    kept = {tuple(c) for c in grid.coords[2][grid.tissue_fraction[2] >= 0.5].tolist()}
    assert {tuple(c) for c in pruned.coords[2].tolist()} <= kept


def test_quadtree_uneven_slide_mpp_halves_exactly(band_slides, band_tissue):
    reader = SlideReader(band_slides[0.25].path, mpp=0.2528)  # 64 px at 1 µm/px = 253.2 px
    grid = quadtree_grid(reader, 64, (4.0, 2.0, 1.0), min_tissue=0.25)
    assert grid.extent_level0 == (1012, 506, 253)
    nominal = 64 * np.array(grid.mpp) / 0.2528
    assert (np.abs(np.array(grid.extent_level0) - nominal) <= 2).all()
    _check_tree(grid)
    with pytest.raises(ConfigError, match="0.2528"):
        grid.read(band_slides[0.25], 0, 0)  # a reader at another mpp


# -- serialisation and errors -------------------------------------------------------------------
def test_round_trip_through_npz(band_slides, band_tissue, tmp_path):
    reader = band_slides[0.5]
    cgrid = concentric_grid(reader, 64, 1.0, tissue=band_tissue)
    qgrid = quadtree_grid(reader, 64, (4.0, 2.0, 1.0), 0.25, band_tissue, min_child_tissue=0.5)
    for grid, cls in ((cgrid, ConcentricGrid), (qgrid, QuadtreeGrid)):
        np.savez(tmp_path / "grid.npz", **grid.to_arrays())
        with np.load(tmp_path / "grid.npz", allow_pickle=False) as data:
            back = cls.from_arrays(data)
        a, b = grid.to_arrays(), back.to_arrays()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype, key
    back = QuadtreeGrid.from_arrays(qgrid.to_arrays())
    for p in range(len(back)):
        np.testing.assert_array_equal(back.children(0, p), qgrid.children(0, p))
    np.testing.assert_array_equal(back.read(reader, 2, 3), qgrid.read(reader, 2, 3))
    with pytest.raises(StoreError, match="not a 'concentric'"):
        ConcentricGrid.from_arrays(qgrid.to_arrays())
    with pytest.raises(StoreError, match="do not match"):
        ConcentricGrid.from_arrays(cgrid.to_arrays() | {"boxes": cgrid.boxes[:, :2]})
    partial = {k: v for k, v in qgrid.to_arrays().items() if k != "parent_1"}
    with pytest.raises(StoreError, match="parent_1"):
        QuadtreeGrid.from_arrays(partial)
    broken = qgrid.to_arrays() | {"parent_2": qgrid.parent[2] + 1000}
    with pytest.raises(StoreError, match="parent index"):
        QuadtreeGrid.from_arrays(broken)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level_mpps": (2.0, 1.5, 0.5)}, "must halve"),
        ({"level_mpps": (0.5, 1.0)}, "must halve"),
        ({"level_mpps": ()}, "at least one"),
        ({"level_mpps": (2.0, 0.0)}, "positive"),
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": -64}, "tile_size"),
        ({"tile_size": 64.5}, "tile_size"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"min_child_tissue": -0.1}, "min_child_tissue"),
        ({"tile_size": 1, "level_mpps": (0.2, 0.1)}, "smaller than one pixel"),
    ],
)
def test_quadtree_errors(band_slides, band_tissue, kwargs, match):
    args = {"tile_size": 64, "level_mpps": (4.0, 2.0, 1.0), "tissue": band_tissue} | kwargs
    with pytest.raises(ConfigError, match=match):
        quadtree_grid(band_slides[0.5], **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"mpp": -1.0}, "mpp"),
        ({"context": ()}, "context"),
        ({"context": (1, 0)}, "context"),
        ({"context": (1, 2, 2)}, "distinct"),
    ],
)
def test_concentric_errors(band_slides, band_tissue, kwargs, match):
    args = {"tile_size": 64, "mpp": 1.0, "tissue": band_tissue} | kwargs
    with pytest.raises(ConfigError, match=match):
        concentric_grid(band_slides[0.5], **args)


def test_pad_value_and_no_tissue_errors(band_slides, band_tissue):
    with pytest.raises(ConfigError, match="pad_value"):
        read_window(band_slides[0.5], (0, 0), 8, 0.5, pad_value=300)
    with pytest.raises(ConfigError, match="pad_value"):
        read_window(band_slides[0.5], (0, 0), 8, 0.5, pad_value=(1, 2))
    with pytest.raises(NoTissueError, match="no .* tile"):  # 512 µm tiles: band covers 75% max
        quadtree_grid(band_slides[0.5], 64, (8.0, 4.0), min_tissue=0.9, tissue=band_tissue)
    with pytest.raises(NoTissueError):
        concentric_grid(band_slides[0.5], 64, 8.0, min_tissue=0.9, tissue=band_tissue)


def test_no_tissue_from_segmentation_propagates(tmp_path):
    write_pyramid_tiff(tmp_path / "blank.tiff", np.full((512, 512, 3), 250, np.uint8), 0.5)
    reader = SlideReader(tmp_path / "blank.tiff")
    with pytest.raises(NoTissueError, match="no tissue"):
        quadtree_grid(reader, 32, (2.0, 1.0))
    with pytest.raises(NoTissueError, match="no tissue"):
        concentric_grid(reader, 32, 1.0)
