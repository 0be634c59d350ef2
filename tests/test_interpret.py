"""Feature attribution: planted-feature recovery, tile-label rules, localisation AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.analysis.interpret import localisation_auc
from wsi_lightning.slides.annotations import Lesion, load_lesions, tile_labels

PLANTED, DIM, TILE = 7, 16, 100


def _square(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """48 slides on a 10x10 tile grid; tumour slides have a 2x2 lesion whose tiles carry a high
    feature PLANTED; lesions are written as GeoJSON squares."""
    from wsi_lightning.features.store import FeatureStore

    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "store")
    (tmp_path / "annotations").mkdir()
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * TILE
    rows = []
    for i in range(48):
        tumour = i % 2 == 1
        feats = rng.normal(size=(100, DIM)).astype(np.float32)
        gj = {"type": "FeatureCollection", "features": []}
        if tumour:
            gx, gy = (int(v) for v in rng.integers(0, 8, 2))
            inside = (grid[:, 0] // TILE >= gx) & (grid[:, 0] // TILE < gx + 2) & (grid[:, 1] // TILE >= gy) & (grid[:, 1] // TILE < gy + 2)
            feats[inside, PLANTED] += 6.0
            gj["features"].append({"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                                   "geometry": {"type": "Polygon", "coordinates": [_square(gx * TILE, gy * TILE, 2 * TILE)]}})
        sid = f"s{i:02d}"
        (tmp_path / "annotations" / f"{sid}.geojson").write_text(json.dumps(gj))
        store.write_slide(sid, feats, grid.astype(np.int64), {"mpp": 0.5, "tile_size": TILE, "tile_size_um": 50.0,
                          "level": 0, "extent_level0": TILE, "backbone": "planted", "weights_hash": "-", "extraction": {}})
        rows.append({"slide_id": sid, "case_id": f"c{i}", "path": f"slides/{sid}.tiff",
                     "label": "tumor" if tumour else "normal"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


@pytest.mark.parametrize("exp,extra", [("chowder", {"method.scorer_l2": 0.0}), ("attention_mil_interp", {})])
def test_attribution_finds_the_planted_feature(planted: Path, tmp_path: Path, exp: str, extra: dict):
    over = feature_cfg_overrides(planted, tmp_path / "runs", **{
        "trainer.max_epochs": 30, "optim.lr": 1e-2, "data.batch_size": 4, "seed": 1, "method.dropout": 0.0,
        **extra, "callbacks": "[{name: feature_attribution, top_features: 2, top_positions: 2}]"})
    res = run.fit(config.load(exp, over))
    out = res.run_dir / "attribution"
    sel = pd.read_csv(out / "selected.csv")
    tumour_feats = sel[(sel["class"] == "tumor") & (sel["question"] == "Q2 tile feature")]["index"].tolist()
    assert tumour_feats[0] == PLANTED, sel
    assert res.metrics["attribution/loc_auc/feature/all"] > 0.9  # H averages PLANTED with 1 other feature
    # the reported AUC is scikit-learn's on the written tiles
    tiles = pd.read_csv(out / "tiles.csv")
    assert res.metrics["attribution/loc_auc/feature/all"] == pytest.approx(roc_auc_score(tiles["gt"], tiles["H"]))
    tum = tiles[tiles["slide_id"].isin(set(tiles.loc[tiles["gt"] == 1, "slide_id"]))]
    assert res.metrics["attribution/loc_auc/feature/tumour_slides"] == pytest.approx(roc_auc_score(tum["gt"], tum["H"]))
    loc = pd.read_csv(out / "localisation.csv")
    assert set(loc["predictor"]) == {"feature", "feature_oriented", "tile_scores"}
    assert json.loads((res.run_dir / "metrics.json").read_text())["metrics"]["attribution/loc_auc/feature/all"] > 0.9


def test_tile_label_rules_on_hand_made_polygons(tmp_path: Path):
    # a right triangle covering the lower-left half of the square [0, 200]^2
    tri = Lesion(np.array([[0, 0], [0, 200], [200, 200]], dtype=float))
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [300, 300]])
    # tile (0,0): centre (50,50) on the diagonal -> matplotlib treats boundary as outside/inside;
    # use tiles whose centres are clearly placed
    c = tile_labels(coords, 100, [tri], "centre")
    assert c.tolist() == [c[0], False, True, c[3], False]
    o = tile_labels(coords, 100, [tri], "overlap", min_overlap=0.4, grid=16)
    assert o.tolist() == [True, False, True, True, False]  # half-covered tiles pass 0.4
    o2 = tile_labels(coords, 100, [tri], "overlap", min_overlap=0.9, grid=16)
    assert o2.tolist() == [False, False, True, False, False]  # only the fully covered tile
    # holes (exclusions) are not lesion
    ring = [[0, 0], [300, 0], [300, 300], [0, 300]]
    hole = [[100, 100], [200, 100], [200, 200], [100, 200]]
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}},
        {"type": "Feature", "properties": {"classification": {"name": "Exclusion"}},
         "geometry": {"type": "Polygon", "coordinates": [hole]}}]}
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(gj))
    les = load_lesions(p)
    y = tile_labels(np.array([[0, 0], [100, 100]]), 100, les, "centre")
    assert y.tolist() == [True, False]
    with pytest.raises(ValueError, match="tile-label rule"):
        tile_labels(coords, 100, [tri], "area")


def test_localisation_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    gt = [rng.random(50) < 0.2 for _ in range(4)]
    pred = [g * 0.5 + rng.random(50) for g in gt]
    assert localisation_auc(pred, gt) == pytest.approx(roc_auc_score(np.concatenate(gt), np.concatenate(pred)))
    assert np.isnan(localisation_auc([np.ones(3)], [np.zeros(3, bool)]))


def test_callback_argument_validation():
    from wsi_lightning.callbacks.feature_attribution import FeatureAttribution

    with pytest.raises(ValueError, match="gradient='hessian'"):
        FeatureAttribution(gradient="hessian")
    with pytest.raises(ValueError, match="top_features must be >= 1"):
        FeatureAttribution(top_features=0)


def test_attribute_command_on_a_finished_run(planted: Path, tmp_path: Path):
    from wsi_lightning.cli import main

    over = feature_cfg_overrides(planted, tmp_path / "runs", **{
        "trainer.max_epochs": 2, "method.scorer_l2": 0.0})
    res = run.fit(config.load("chowder", over))
    assert not (res.run_dir / "attribution").exists()
    assert main(["attribute", str(res.run_dir), "top_features=3", "gradient=grad", "tile_rule=overlap"]) == 0
    sel = pd.read_csv(res.run_dir / "attribution" / "selected.csv")
    assert (sel[sel["question"] == "Q2 tile feature"].groupby("class").size() <= 3).all()
    assert pd.read_csv(res.run_dir / "attribution" / "localisation.csv")["tile_rule"].eq("overlap").all()
    metrics = json.loads((res.run_dir / "metrics.json").read_text())["metrics"]
    assert "test/auroc" in metrics and "attribution/loc_auc/feature/all" in metrics
    assert main(["attribute", str(res.run_dir), "gradient=hessian"]) == 2


def test_attribution_reads_the_features_the_model_was_trained_on():
    """With data.standardize the attribution bags go through the datamodule's scaler."""
    from types import SimpleNamespace

    from wsi_lightning.callbacks.feature_attribution import _test_bags

    feats = np.arange(6, dtype=np.float16).reshape(3, 2)
    manifest = SimpleNamespace(df=pd.DataFrame({"slide_id": ["a"]}),
                               label_index=lambda target: pd.Series([1]))
    dm = SimpleNamespace(manifest=manifest, splits={"test": ["a"]},
                         store=SimpleNamespace(read=lambda sid: (feats, np.zeros((3, 2)))),
                         scaler=lambda x: (x - 1.0) * 2.0)
    (_, bag, _, label), = _test_bags(dm, "label")
    np.testing.assert_allclose(bag.numpy(), (feats.astype(np.float32) - 1) * 2)
    assert label == 1
    dm.scaler = None
    np.testing.assert_allclose(_test_bags(dm, "label")[0][1].numpy(), feats.astype(np.float32))
