"""``wsi export-qupath``: on a real tiny fit (CHOWDER on demo slides, with the attention logger and
feature attribution) the files validate against the GeoJSON spec (a maintained validator and our
own RFC 7946 checks), follow QuPath's conventions, hold exactly one detection per tile with the
values of attention.csv, and round-trip through our annotation reader; several maps, ``--map``,
slides without files and bad input through the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from geojson_pydantic import FeatureCollection
from omegaconf import OmegaConf

from tests.conftest import feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.cli import main
from wsi_lightning.features.extract import plan_slide
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest
from wsi_lightning.qupath import export_qupath
from wsi_lightning.slides.annotations import load_lesions, load_regions, read_polygons

TILING = {"tile_size": 64, "mpp": 1.0, "min_tissue": 0.5, "thumb_mpp": 8.0}
FEATS = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 64,
         "num_workers": 0, "dtype": "float16", "accelerator": "cpu", "devices": 1}
LOGGER = "wsi_lightning.qupath"


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CHOWDER fit on 7 tiny demo slides: attention.csv (its tile scores) and attribution/tiles.csv."""
    from wsi_lightning.demo.dataset import make_demo_dataset
    from wsi_lightning.features.extract import extract_features

    root = tmp_path_factory.mktemp("qupath_demo")
    manifest = make_demo_dataset(root / "demo", n_slides=7, seed=3, workers=1, size_um=768.0)
    extract_features(load_manifest(manifest), FeatureStore(root / "store"), TILING, FEATS)
    callbacks = ("[{name: attention_logger, normalisation: minmax, max_slides: 0, top_k: 0, bottom_k: 0}, "
                 "{name: feature_attribution, max_heatmaps: 0, montage_tiles: 1, top_features: 1}]")
    over = feature_cfg_overrides(manifest, root / "runs", **{
        "data.store": root / "store", "tiling.tile_size": 64, "tiling.mpp": 1.0, "features.backbone": "demo_cnn",
        "features.pretrained": "false", "trainer.max_epochs": 1, "callbacks": callbacks})
    return run.fit(config.load("chowder", over)).run_dir


# ----------------------------------------------------------------------------- GeoJSON checks
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def check_rfc7946(path: Path) -> dict:
    """Our RFC 7946 checks beside geojson-pydantic's: strict JSON numbers (no NaN, no strings),
    closed rings of >= 4 positions, the right-hand rule (exteriors counter-clockwise, holes
    clockwise), string or number ids, ``properties`` an object."""
    gj = json.loads(path.read_text(), parse_constant=_reject_constant)
    FeatureCollection.model_validate(gj)  # the maintained validator of the spec's structure
    assert gj["type"] == "FeatureCollection" and isinstance(gj["features"], list)
    for f in gj["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict)
        assert isinstance(f.get("id", ""), str | int)
        geom = f["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        assert geom["type"] in ("Polygon", "MultiPolygon") and polys
        for rings in polys:
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1], "a linear ring is closed, >= 4 positions"
                for pos in ring:
                    assert len(pos) in (2, 3) and all(type(v) in (int, float) and np.isfinite(v) for v in pos)
                xy = np.asarray(ring, float)
                area = 0.5 * np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1])  # shoelace
                assert (area > 0) if k == 0 else (area < 0), "right-hand rule"
    return gj


def _by_type(gj: dict) -> tuple[list[dict], list[dict]]:
    feats = gj["features"]
    return ([f for f in feats if f["properties"]["objectType"] == "detection"],
            [f for f in feats if f["properties"]["objectType"] == "annotation"])


# ----------------------------------------------------------------------------- a real run
def test_export_of_a_fit_validates_holds_every_tile_and_round_trips(fit_run: Path, tmp_path: Path):
    files = export_qupath(fit_run)
    preds = pd.read_csv(fit_run / "test_predictions.csv", dtype={"slide_id": str})
    att = pd.read_csv(fit_run / "attention" / "attention.csv", dtype={"slide_id": str})
    attr = pd.read_csv(fit_run / "attribution" / "tiles.csv", dtype={"slide_id": str})
    assert [f.name for f in files] == [f"{s}.geojson" for s in sorted(preds["slide_id"])]
    assert all(f.parent == fit_run / "qupath" for f in files)
    assert not list((fit_run / "qupath").glob(".*")), "temp files left behind"
    classes = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
    for path in files:
        sid = path.stem
        gj = check_rfc7946(path)
        det, ann = _by_type(gj)
        rows, arows, pred = att[att["slide_id"] == sid], attr[attr["slide_id"] == sid], preds.set_index("slide_id").loc[sid]
        assert len(det) == len(rows) == len(arows) > 0 and len(ann) == 1  # one map: a detection per tile
        want = rows.set_index(["x", "y"])
        for f in det:
            (x, y), (x1, y1) = f["geometry"]["coordinates"][0][0], f["geometry"]["coordinates"][0][2]
            r = want.loc[(x, y)]
            assert x1 - x == y1 - y == r["extent"] == 128  # 64 px at 1 µm/px on 0.5 µm/px slides
            assert f["properties"]["classification"]["name"] == pred["pred"]
            assert len(f["properties"]["classification"]["color"]) == 3
            m = f["properties"]["measurements"]
            assert m["attention"] == pytest.approx(r["attention"], rel=1e-12)
            assert m["attention (normalised)"] == pytest.approx(r["normalised"], rel=1e-12, abs=1e-15)
            a = arows[(arows["x"] == x) & (arows["y"] == y)].iloc[0]
            assert (m["tile score"], m["H"], m["H oriented"]) == pytest.approx((a["tile_score"], a["H"], a["H_oriented"]))
            assert m["tile score"] == pytest.approx(m["attention"], rel=1e-5, abs=1e-6)  # CHOWDER's map: its scores
        props = ann[0]["properties"]
        assert props["classification"]["name"] == "Tissue" and props["metadata"]["prediction"] == pred["pred"]
        assert props["metadata"]["label"] == pred["label"] and pred["pred"] in props["name"]
        for c in classes:
            assert props["measurements"][f"prob {c}"] == pytest.approx(pred[f"prob_{c}"])
        assert props["measurements"]["predicted class index"] == classes.index(pred["pred"])
        outline = shapely.geometry.shape(ann[0]["geometry"])
        assert outline.is_valid
        centres = want.reset_index()[["x", "y"]].to_numpy() + 64
        assert shapely.contains_xy(outline, centres[:, 0], centres[:, 1]).mean() >= 0.9  # level-0, on the tissue

        # our reader: the detections are not lesions, the outline is the only region
        assert load_lesions(path) == [] and [n for n, _ in read_polygons(path)] == ["tissue"]
        assert len(load_regions(path, "Tissue")) == len(getattr(outline, "geoms", [outline]))
        # and the export is a valid ROI: tiling inside it keeps (nearly) the same tiles
        row = load_manifest(OmegaConf.load(fit_run / "config.resolved.yaml").data.manifest).df.set_index("slide_id", drop=False).loc[sid]
        plan = plan_slide(pd.Series({**row.to_dict(), "roi": str(path)}), TILING, tmp_path / "tiles")
        kept = {tuple(c) for c in plan.coords.tolist()}
        orig = {tuple(c) for c in want.reset_index()[["x", "y"]].to_numpy().tolist()}
        assert kept <= orig and len(kept) >= 0.9 * len(orig)


def test_cli_export_to_another_folder(fit_run: Path, tmp_path: Path):
    out = tmp_path / "qp"
    assert main(["export-qupath", str(fit_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.geojson" for s in pd.read_csv(
        fit_run / "test_predictions.csv", dtype={"slide_id": str})["slide_id"])


# ----------------------------------------------------------------------------- hand-made folders
def _copy_run(fit_run: Path, dest: Path, manifest: Path | None = None) -> Path:
    """The run's config and predictions in a new folder (optionally with another manifest)."""
    dest.mkdir(parents=True)
    cfg = OmegaConf.load(fit_run / "config.resolved.yaml")
    if manifest is not None:
        cfg.data.manifest = str(manifest)
    OmegaConf.save(cfg, dest / "config.resolved.yaml")
    shutil.copy(fit_run / "test_predictions.csv", dest / "predictions.csv")  # as a predict folder names it
    return dest


def test_several_maps_named_maps_and_one_map(fit_run: Path, tmp_path: Path):
    att = pd.read_csv(fit_run / "attention" / "attention.csv", dtype={"slide_id": str, "map": str})
    heads = pd.concat([att, att.assign(map="1", attention=att["attention"] * 2, normalised=1 - att["normalised"])])
    heads.loc[heads["map"] == "1", "extent"] = np.nan  # extent not recorded: the store's is used
    sid = att["slide_id"].iloc[0]
    one = att[att["slide_id"] == sid]
    coarse = pd.DataFrame({"slide_id": sid, "map": "level0", "tile": [0, 1], "x": [0, 256], "y": [0, 0],
                           "extent": 256.0, "attention": [0.25, 0.75], "normalised": [0.0, 1.0]})
    folder = _copy_run(fit_run, tmp_path / "run")
    (folder / "attention").mkdir()
    pd.concat([heads, coarse]).to_csv(folder / "attention" / "attention.csv", index=False)
    export_qupath(folder)
    path = folder / "qupath" / f"{sid}.geojson"
    det, _ = _by_type(check_rfc7946(path))
    assert len(det) == len(one) + 2  # maps 0 and 1 share their tiles; level0 has its own geometry
    fine = [f for f in det if f["geometry"]["coordinates"][0][2][0] - f["geometry"]["coordinates"][0][0][0] == 128]
    for f in fine:
        x, y = f["geometry"]["coordinates"][0][0]
        r = one[(one["x"] == x) & (one["y"] == y)].iloc[0]
        m = f["properties"]["measurements"]
        assert m["attention map 0"] == pytest.approx(r["attention"]) and m["attention map 1"] == pytest.approx(2 * r["attention"])
        assert m["attention map 1 (normalised)"] == pytest.approx(1 - r["normalised"])
        assert "attention" not in m
    big = [f["properties"]["measurements"] for f in det if f not in fine]
    assert [m["attention level0"] for m in big] == [0.25, 0.75]

    out = tmp_path / "map1"
    assert main(["export-qupath", str(folder), "--out", str(out), "--map", "1"]) == 0
    det, _ = _by_type(check_rfc7946(out / f"{sid}.geojson"))
    assert len(det) == len(one)
    assert sorted(f["properties"]["measurements"]["attention"] for f in det) == pytest.approx(sorted(2 * one["attention"]))


def test_slides_without_files_export_tiles_with_one_warning(fit_run: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture):
    cfg = OmegaConf.load(fit_run / "config.resolved.yaml")
    df = pd.read_csv(cfg.data.manifest)
    df["path"] = ""  # features imported without slides
    manifest = tmp_path / "imported.csv"
    df.to_csv(manifest, index=False)
    folder = _copy_run(fit_run, tmp_path / "run", manifest)
    shutil.copytree(fit_run / "attention", folder / "attention")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        files = export_qupath(folder)
    warned = [r for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "tissue outline" in warned[0].getMessage() and "tiles are written" in warned[0].getMessage()
    att = pd.read_csv(folder / "attention" / "attention.csv", dtype={"slide_id": str})
    for path in files:
        det, ann = _by_type(check_rfc7946(path))
        assert ann == [] and len(det) == (att["slide_id"] == path.stem).sum() > 0


@pytest.mark.parametrize("args, named", [
    (["--map", "7"], "--map '7' is not in"),
    (["--map", "0", "--out"], None),  # argparse: --out needs a value
])
def test_bad_input_through_the_cli(fit_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                   args: list[str], named: str | None):
    if named is None:
        with pytest.raises(SystemExit):
            main(["export-qupath", str(fit_run), *args])
        return
    with caplog.at_level(logging.ERROR):
        assert main(["export-qupath", str(fit_run), *args, "--out", str(tmp_path / "o")]) == 2
    assert named in caplog.text and "its maps: ['0']" in caplog.text
    assert not (tmp_path / "o").exists()


def test_a_folder_that_is_not_a_run_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert main(["export-qupath", str(tmp_path)]) == 2
    assert f"{tmp_path}: no config.resolved.yaml" in caplog.text and "wsi predict output folder" in caplog.text
