"""Regions of interest (manifest column ``roi`` / ``tissue_mask``): a known answer (an ROI over
exactly the left half keeps exactly the left-half tiles) for every ROI form, a changed ROI
re-tiles and re-extracts, the rasteriser against shapely, and bad ROI files through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from wsi_lightning.cli import main
from wsi_lightning.errors import ManifestError, StoreError
from wsi_lightning.features.extract import extract_features, plan_manifest
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest
from wsi_lightning.slides import write_pyramid_tiff
from wsi_lightning.slides.regions import mask_polygons, rasterize

SIZE = 1024  # level-0 px at 0.5 µm/px; tiles of 64 px at 1 µm/px span 128 level-0 px
TILING = {"tile_size": 64, "mpp": 1.0, "min_tissue": 0.5, "thumb_mpp": 8.0}
FEATS = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 64,
         "num_workers": 0, "dtype": "float16", "accelerator": "cpu", "devices": 1}
TILE_ARGS = [f"tiling.{k}={v}" for k, v in TILING.items()]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tissue over rows 128-896 of the whole width, glass above and below: 6 x 8 tissue tiles."""
    img = np.full((SIZE, SIZE, 3), 240, np.uint8)
    rng = np.random.default_rng(0)
    img[128:896] = (np.array([200, 110, 170]) + rng.integers(-10, 10, (768, SIZE, 3))).clip(0, 255)
    path = tmp_path_factory.mktemp("roi_slide") / "s.tiff"
    write_pyramid_tiff(path, img, 0.5, n_levels=3)
    return path


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _geojson(path: Path, *polys: tuple[list, str | None], shape: str = "collection") -> Path:
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
              "properties": {"objectType": "annotation", **({"classification": {"name": c, "color": [1, 2, 3]}} if c else {})}}
             for ring, c in polys]
    path.write_text(json.dumps(feats if shape == "array" else {"type": "FeatureCollection", "features": feats}))
    return path


def _manifest(root: Path, slide: Path, roi: str | None, column: str = "roi") -> Path:
    """Two rows (one per label: a manifest needs two classes) on the same slide file."""
    rows = [{"slide_id": f"s_{lab}", "case_id": f"c_{lab}", "path": str(slide), "label": lab} for lab in "ab"]
    if roi is not None:
        for r in rows:
            r[column] = roi
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _tiles(manifest: Path, tiles: Path) -> dict[str, np.ndarray]:
    plans, _ = plan_manifest(load_manifest(manifest), TILING, tiles)
    return {p.slide_id: p.coords for p in plans}


# ----------------------------------------------------------------------------- the known answer
def _left_half_rois(root: Path) -> dict[str, str]:
    """The same region, the left half of the slide, in every form the reader takes."""
    left = _square(0, 0, SIZE / 2, SIZE)
    _geojson(root / "left.geojson", (left, "Region*"))
    _geojson(root / "left_array.json", (left, None), shape="array")
    # the whole slide minus an Exclusion over the right half, plus a detection the reader skips
    _geojson(root / "excl.geojson", (_square(0, 0, SIZE, SIZE), "Tissue"), (_square(SIZE / 2, 0, SIZE, SIZE), "Exclusion"))
    gj = json.loads((root / "excl.geojson").read_text())
    gj["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        _square(SIZE / 2, 0, SIZE, SIZE)]}, "properties": {"objectType": "detection"}})
    (root / "excl.geojson").write_text(json.dumps(gj))
    for name, (w, h) in {"left16.png": (64, 64), "left100.png": (100, 100), "left.tiff": (256, 256)}.items():
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        if name.endswith(".png"):
            Image.fromarray(mask).save(root / name)
        else:
            import tifffile

            tifffile.imwrite(root / name, mask)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: the alpha channel is not the region
    rgba[:, :16, 0] = 200
    Image.fromarray(rgba).save(root / "left_rgba.png")
    return {n: n for n in ("left.geojson", "left_array.json", "excl.geojson", "left16.png", "left100.png",
                           "left.tiff", "left_rgba.png")}


def test_an_roi_over_the_left_half_keeps_exactly_the_left_half_tiles(slide: Path, tmp_path: Path):
    full = _tiles(_manifest(tmp_path, slide, None), tmp_path / "tiles_full")["s_a"]
    assert len(full) == 48 and (full[:, 0] >= SIZE / 2).sum() == 24  # 6 rows x 8 columns of tissue
    expected = full[full[:, 0] + 128 <= SIZE / 2]  # tiles wholly in the left half
    for name in _left_half_rois(tmp_path):
        for column in ("roi", "tissue_mask"):
            got = _tiles(_manifest(tmp_path, slide, name, column), tmp_path / f"tiles_{name}_{column}")
            for sid, coords in got.items():
                np.testing.assert_array_equal(coords, expected, err_msg=f"{name} ({column}), {sid}")


def test_a_tile_straddling_the_roi_follows_min_tissue(slide: Path, tmp_path: Path):
    """The ROI's right edge at x = 576 cuts the 5th tile column (512-640) in half: kept at
    min_tissue 0.5 (half its area is tissue inside), dropped at 0.6."""
    _geojson(tmp_path / "r.geojson", (_square(0, 0, 576, SIZE), None))
    m = load_manifest(_manifest(tmp_path, slide, "r.geojson"))
    for min_tissue, max_x in ((0.5, 512), (0.6, 384)):
        plans, _ = plan_manifest(m, {**TILING, "min_tissue": min_tissue}, tmp_path / f"t{min_tissue}")
        assert plans[0].coords[:, 0].max() == max_x, min_tissue


# ----------------------------------------------------------------------------- provenance
def test_a_changed_roi_retiles_and_reextracts(slide: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    roi = tmp_path / "roi.geojson"
    _geojson(roi, (_square(0, 0, SIZE / 2, SIZE), None))
    manifest = _manifest(tmp_path, slide, roi.name)
    store = FeatureStore(tmp_path / "store")
    assert sorted(extract_features(load_manifest(manifest), store, TILING, FEATS)) == ["s_a", "s_b"]
    assert (store.read_coords("s_a")[:, 0] < SIZE / 2).all() and store.num_instances("s_a") == 24
    recorded = store.attrs("s_a")["roi"]
    assert recorded["file"] == str(roi) and len(recorded["sha256"]) == 16
    assert extract_features(load_manifest(manifest), store, TILING, FEATS) == []  # same ROI: reused

    _geojson(roi, (_square(SIZE / 2, 0, SIZE, SIZE), None))  # the same file, redrawn on the right half
    with caplog.at_level(logging.INFO, logger="wsi_lightning.features.extract"):
        assert sorted(extract_features(load_manifest(manifest), store, TILING, FEATS)) == ["s_a", "s_b"]
    assert "its roi changed since extraction" in caplog.text
    assert (store.read_coords("s_a")[:, 0] >= SIZE / 2).all() and store.num_instances("s_a") == 24
    assert store.attrs("s_a")["roi"]["sha256"] != recorded["sha256"]
    tiles = np.load(tmp_path / "store" / "tiles" / "s_a.npz")  # the tile cache was redone too
    assert (tiles["coords"][:, 0] >= SIZE / 2).all() and str(tiles["key"]).endswith(store.attrs("s_a")["roi"]["sha256"])

    _manifest(tmp_path, slide, None)  # ROI removed: every tissue tile again
    assert sorted(extract_features(load_manifest(manifest), store, TILING, FEATS)) == ["s_a", "s_b"]
    assert store.num_instances("s_b") == 48 and "roi" not in store.attrs("s_b")


def test_a_new_roi_that_fails_never_leaves_the_old_features_in_use(slide: Path, tmp_path: Path):
    """With skip_errors a slide whose new ROI cannot be tiled would keep its old-ROI features in
    the store (and train on them): refused, naming the slide; the old ROI back extracts nothing."""
    roi = _geojson(tmp_path / "roi.geojson", (_square(0, 0, SIZE / 2, SIZE), None))
    manifest = _manifest(tmp_path, slide, roi.name)
    store = FeatureStore(tmp_path / "store")
    extract_features(load_manifest(manifest), store, TILING, FEATS)
    good = roi.read_text()
    roi.write_text("{ not json")
    with pytest.raises(StoreError, match=r"\['s_a', 's_b'\] have a new roi that could not be tiled"):
        extract_features(load_manifest(manifest), store, TILING, FEATS, skip_errors=True)
    errors = pd.read_csv(tmp_path / "store" / "errors.csv")
    assert sorted(errors["slide_id"]) == ["s_a", "s_b"] and errors["error"].str.contains("cannot read GeoJSON").all()
    roi.write_text(good)
    assert extract_features(load_manifest(manifest), store, TILING, FEATS) == []


# ----------------------------------------------------------------------------- the rasteriser
def test_rasterize_marks_the_pixel_centres_inside_holes_and_islands_included():
    rng = np.random.default_rng(1)
    ring = shapely.Polygon([(0, 0), (90, 0), (90, 90), (0, 90)], [[(20, 20), (70, 20), (70, 70), (20, 70)]])
    shapes = [shapely.union_all([ring, shapely.box(35.2, 36.3, 55.1, 54.7)]),  # an island in the hole
              shapely.make_valid(shapely.Polygon(rng.uniform(-10, 110, (25, 2))))]  # self-intersecting
    yy, xx = np.mgrid[0:47, 0:53] + 0.5  # pixel centres (no centre on an edge: ties differ by convention)
    for geom in shapes:
        for scale in (1.0, 0.5, 1 / 3):
            got = rasterize(geom, (47, 53), scale)
            np.testing.assert_array_equal(got, shapely.contains_xy(geom, xx / scale, yy / scale))
    mask = rasterize(shapes[1], (120, 120), 1.0)
    poly = mask_polygons(mask, 2.0, simplify=0)  # the mask's pixels, exactly, at 2 level-0 px each
    assert poly.is_valid and poly.area == mask.sum() * 4
    np.testing.assert_array_equal(rasterize(poly, mask.shape, 0.5), mask)


# ----------------------------------------------------------------------------- bad ROI files
def _bad_rois(root: Path) -> dict[str, tuple[str, str]]:
    """{file: (message part, fix part)} for each class of bad ROI file."""
    (root / "garbage.geojson").write_bytes(b"\x00\x01 not json")
    (root / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}}]}))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "empty.png")
    Image.fromarray(np.full((64, 32), 255, np.uint8)).save(root / "tall.png")
    _geojson(root / "elsewhere.geojson", (_square(5000, 5000, 6000, 6000), None))
    return {"missing.geojson": ("does not exist", "fix the 'roi' column"),
            "garbage.geojson": ("cannot read GeoJSON", "export the region again from QuPath"),
            "points.geojson": ("has no polygon area", "draw the region as an area annotation"),
            "corrupt.png": ("cannot be read", "save the mask as a PNG or TIFF"),
            "empty.png": ("is empty (every pixel is 0)", "nonzero pixels mark the region"),
            "tall.png": ("is 32 x 64 px but the slide is 1024 x 1024 px", "the mask must cover the whole slide"),
            "elsewhere.geojson": ("holds no tissue", "drawn on this slide, in level-0 pixels"),
            "region.jpg": ("suffix '.jpg'", "expected a QuPath GeoJSON")}


@pytest.mark.parametrize("name", ["missing.geojson", "garbage.geojson", "points.geojson", "corrupt.png", "empty.png",
                                  "tall.png", "elsewhere.geojson", "region.jpg"])
def test_bad_roi_files_are_named_with_the_row_and_the_fix(name: str, slide: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture):
    what, fix = _bad_rois(tmp_path)[name]
    (tmp_path / "region.jpg").write_bytes(b"")
    manifest = _manifest(tmp_path, slide, name)
    with caplog.at_level(logging.ERROR):
        assert main(["tile", str(manifest), "--out", str(tmp_path / "tiles"), *TILE_ARGS]) == 2
    msg = caplog.text
    assert f"manifest {manifest} row 1" in msg and "s_a" in msg and name in msg, msg
    assert what in msg and fix in msg, msg
    assert not list((tmp_path / "tiles").glob("*.npz")), "no tile file for a bad ROI"


def test_both_roi_columns_are_refused(slide: Path, tmp_path: Path):
    path = _manifest(tmp_path, slide, "a.geojson")
    df = pd.read_csv(path)
    df["tissue_mask"] = "b.png"
    df.to_csv(path, index=False)
    with pytest.raises(ManifestError, match="both 'roi' and 'tissue_mask' columns"):
        load_manifest(path, check_files=False)


def test_on_the_fly_sampling_warns_that_it_ignores_the_roi(slide: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture):
    from wsi_lightning import build, config

    _geojson(tmp_path / "left.geojson", (_square(0, 0, SIZE / 2, SIZE), None))
    manifest = _manifest(tmp_path, slide, "left.geojson")
    cfg = config.load("magnet_3layer", [f"data.manifest={manifest}", "logger.wandb.enabled=false"])
    with caplog.at_level(logging.WARNING, logger="wsi_lightning.build"):
        build.build_datamodule(cfg)
    assert "its roi column restricts tiling only" in caplog.text
