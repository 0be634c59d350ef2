"""Tiling + extraction as a Lightning predict run: store contents, resume, bad slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_lightning.demo.dataset import make_demo_dataset
from wsi_lightning.errors import WSIError
from wsi_lightning.features import extract as ex
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest

TILING = {"tile_size": 64, "mpp": 1.0, "min_tissue": 0.5, "thumb_mpp": 8.0}
FEATS = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 32,
         "num_workers": 0, "dtype": "float16", "accelerator": "cpu", "devices": 1}


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_slides=4, seed=3, workers=1, size_um=768.0)


def test_extract_fills_store_with_level0_coords(demo_manifest: Path, tmp_path: Path):
    m = load_manifest(demo_manifest)
    store = FeatureStore(tmp_path / "store")
    written = ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles")
    assert sorted(written) == sorted(m.df["slide_id"])
    for sid in m.df["slide_id"]:
        feats, coords = store.read(sid)
        plan = np.load(tmp_path / "tiles" / f"{sid}.npz")
        assert feats.shape[0] == coords.shape[0] == len(plan["coords"]) > 0
        np.testing.assert_array_equal(coords, plan["coords"])
        assert np.isfinite(feats).all() and feats.dtype == np.float16
        a = store.attrs(sid)
        assert a["mpp"] == 1.0 and a["tile_size"] == 64 and a["tile_size_um"] == 64.0
        assert a["extent_level0"] == 128  # demo slides are 0.5 µm/px at level 0
        assert a["backbone"] == "demo_cnn" and a["weights_hash"]
        assert (tmp_path / "tiles" / "qc" / f"{sid}.png").exists()
    # a rerun has nothing to do
    assert ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles") == []


def test_interrupted_extraction_resumes_without_partial_slide(demo_manifest: Path, tmp_path: Path, monkeypatch):
    m = load_manifest(demo_manifest)
    store = FeatureStore(tmp_path / "store")
    first = ex.plan_manifest(m, TILING, tmp_path / "tiles")[0][0]
    n_first = len(first.coords)
    real_step = ex.ExtractionModule.predict_step
    seen = {"n": 0}

    def crashing_step(self, batch, batch_idx):
        seen["n"] += len(batch["image"])
        if seen["n"] > n_first + 40:  # well into the second slide
            raise RuntimeError("simulated crash")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(ex.ExtractionModule, "predict_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ex.extract_features(m, store, TILING, {**FEATS, "batch_size": 16}, tiles_dir=tmp_path / "tiles")
    done = store.complete_slides()
    assert done == [first.slide_id], "only the first slide may be complete"
    mtime = store.path(first.slide_id).stat().st_mtime_ns
    monkeypatch.setattr(ex.ExtractionModule, "predict_step", real_step)
    written = ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles")
    assert first.slide_id not in written and len(written) == len(m.df) - 1
    assert sorted(store.complete_slides()) == sorted(m.df["slide_id"])
    assert store.path(first.slide_id).stat().st_mtime_ns == mtime


def test_bad_slides_stop_or_are_reported(demo_manifest: Path, tmp_path: Path):
    df = pd.read_csv(demo_manifest)
    bad = tmp_path / "corrupt.tiff"
    good = Path(demo_manifest.parent / df["path"][0]).read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated slide
    df["path"] = [str(demo_manifest.parent / p) for p in df["path"]]
    df.loc[1, "path"] = str(bad)
    df.loc[2, "path"] = str(tmp_path / "missing.tiff")
    mpath = tmp_path / "m.csv"
    df.to_csv(mpath, index=False)
    m = load_manifest(mpath, check_files=False)
    store = FeatureStore(tmp_path / "store")
    with pytest.raises(WSIError, match="corrupt.tiff"):
        ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles")
    written = ex.extract_features(m, store, TILING, FEATS, skip_errors=True, tiles_dir=tmp_path / "tiles")
    assert sorted(written) == sorted([df["slide_id"][0], df["slide_id"][3]])
    report = pd.read_csv(store.root / "errors.csv")
    assert sorted(report["slide_id"]) == sorted([df["slide_id"][1], df["slide_id"][2]])
    assert report["error"].str.contains("corrupt.tiff|missing.tiff").all()


def test_concentric_extraction_stores_aligned_scales(demo_manifest: Path, tmp_path: Path):
    m = load_manifest(demo_manifest)
    single, multi = FeatureStore(tmp_path / "single"), FeatureStore(tmp_path / "multi")
    ex.extract_features(m, single, TILING, FEATS, tiles_dir=tmp_path / "t1")
    ms_tiling = {**TILING, "multiscale": {"mode": "concentric", "context": [1, 2, 4]}}
    ex.extract_features(m, multi, ms_tiling, FEATS, tiles_dir=tmp_path / "t2")
    sid = m.df["slide_id"][0]
    f1, c1 = single.read(sid)
    f3, c3 = multi.read(sid)
    a = multi.attrs(sid)
    assert a["scales"] == 3 and a["window_um"] == [64.0, 128.0, 256.0] and a["scale_mpp"] == [1.0, 2.0, 4.0]
    np.testing.assert_array_equal(c1, c3)  # same base tiles, row-aligned
    d = f1.shape[1]
    assert f3.shape == (len(f1), 3 * d)
    # the 1x window is the base tile itself
    np.testing.assert_allclose(f3[:, :d].astype(np.float32), f1.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert not np.allclose(f3[:, d:2 * d].astype(np.float32), f1.astype(np.float32), atol=1e-2)


def test_quadtree_extraction_stores_levels_with_parents(demo_manifest: Path, tmp_path: Path):
    from wsi_lightning.data.quadtree import split_levels

    m = load_manifest(demo_manifest)
    store = FeatureStore(tmp_path / "qt")
    qt_tiling = {**TILING, "mpp": 1.0, "multiscale": {"mode": "quadtree", "levels": 3}}
    ex.extract_features(m, store, qt_tiling, FEATS, tiles_dir=tmp_path / "tq")
    sid = m.df["slide_id"][0]
    a = store.attrs(sid)
    assert a["multiscale"] == "quadtree" and a["level_mpp"] == [4.0, 2.0, 1.0]
    n0, n1, n2 = a["level_sizes"]
    assert n1 == 4 * n0 and n2 == 4 * n1  # HAG-MIL keeps all children by default
    levels = split_levels(store, sid)
    ext = a["level_extent_level0"]
    assert ext[0] == 2 * ext[1] == 4 * ext[2]
    for lvl in (1, 2):
        child, par = levels[lvl]["coords"].numpy(), levels[lvl - 1]["coords"].numpy()
        p = levels[lvl]["parent"].numpy()
        off = child - par[p]  # every child inside its parent, at a quadrant offset
        assert set(map(tuple, off.tolist())) == {(0, 0), (0, ext[lvl]), (ext[lvl], 0), (ext[lvl], ext[lvl])}
        np.testing.assert_array_equal(off[:4], [[0, 0], [0, ext[lvl]], [ext[lvl], 0], [ext[lvl], ext[lvl]]])
    # the finest level's features are those of plain tiles at the finest mpp at the same places
    assert levels[2]["features"].shape == (n2, store.feature_dim())
