"""The CLAM / TRIDENT user's path: a results folder as the tools lay it out goes
``wsi import-features`` -> ``wsi fit`` -> ``wsi export-features`` with a manifest that names no
slide files, and the exported ``.h5`` equal the source files."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tests.clam_like import (
    clam_like_bags,
    write_clam_results,
    write_manifest,
    write_trident_job,
)
from tests.conftest import feature_cfg_overrides
from wsi_lightning import cli
from wsi_lightning.errors import ManifestError, StoreError
from wsi_lightning.features.exporters import export_features
from wsi_lightning.features.importers import import_features
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest


def _h5(path):
    with h5py.File(path, "r") as f:
        return (f["features"][()], f["coords"][()], dict(f["coords"].attrs))


def _same_attrs(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, bytes | str) or isinstance(vb, bytes | str):
            assert str(va if not isinstance(va, bytes) else va.decode()) == str(vb if not isinstance(vb, bytes) else vb.decode())
        else:
            np.testing.assert_allclose(np.asarray(va, float), np.asarray(vb, float), err_msg=k)


@pytest.fixture
def bags():
    return clam_like_bags(n_slides=24, n_instances=16, dim=64, seed=3)


def test_clam_results_folder_import_fit_export(tmp_path, bags):
    """CLAM folders -> import (the FEATURES_DIRECTORY itself, patch attributes found in the
    RESULTS_DIRECTORY beside it) -> fit on a manifest without 'path' -> export equals the source."""
    results, features = write_clam_results(bags, tmp_path / "clam")
    manifest = write_manifest(bags, tmp_path / "manifest.csv")
    assert "path" not in pd.read_csv(manifest).columns
    store = tmp_path / "store"
    assert cli.main(["import-features", str(features), "--store", str(store)]) == 0
    fs = FeatureStore(store)
    assert len(fs.complete_slides()) == len(bags)
    attrs = fs.attrs(bags[0].slide_id)
    assert attrs["tile_size"] == 256 and attrs["extent_level0"] == 256  # from RESULTS/patches
    runs = tmp_path / "runs"
    over = feature_cfg_overrides(manifest, runs, **{"data.store": str(store)})
    assert cli.main(["fit", "abmil", *over]) == 0
    run_dir = next((runs / "abmil").iterdir())
    assert (run_dir / "test_predictions.csv").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert len(ckpt["BagDataModule"]["scaler"]["mean"]) == 64  # data.standardize: on by default, saved
    out = tmp_path / "export"
    assert cli.main(["export-features", "--store", str(store), "--out", str(out)]) == 0
    for b in bags:
        src_f, src_c, _ = _h5(features / "h5_files" / f"{b.slide_id}.h5")
        got_f, got_c, got_attrs = _h5(out / "h5_files" / f"{b.slide_id}.h5")
        np.testing.assert_allclose(got_f, src_f, rtol=1e-3, atol=1e-3)  # float16 store at most
        np.testing.assert_array_equal(got_c, src_c)
        with h5py.File(results / "patches" / f"{b.slide_id}.h5", "r") as f:
            _same_attrs(got_attrs, dict(f["coords"].attrs))
        pt = torch.load(out / "pt_files" / f"{b.slide_id}.pt", weights_only=True)
        np.testing.assert_allclose(pt.numpy(), src_f, rtol=1e-3, atol=1e-3)


def test_clam_pt_files_alone_take_coords_from_patches(tmp_path, bags):
    _, features = write_clam_results(bags, tmp_path / "clam")
    for f in (features / "h5_files").iterdir():
        f.unlink()
    (features / "h5_files").rmdir()
    ids = import_features(features, FeatureStore(tmp_path / "store"))
    assert ids == [b.slide_id for b in bags]
    feats, coords = FeatureStore(tmp_path / "store").read(bags[1].slide_id)
    np.testing.assert_array_equal(coords, bags[1].coords)


def test_trident_job_folder_round_trip(tmp_path, bags):
    job = write_trident_job(bags, tmp_path / "job")
    store = FeatureStore(tmp_path / "store")
    assert import_features(job, store) == [b.slide_id for b in bags]  # slide_features_* skipped
    assert store.attrs(bags[0].slide_id)["mpp"] == pytest.approx(0.5)  # 20x
    written = export_features(store, tmp_path / "out", fmt="trident", encoder="uni_v1", progress=False)
    assert len(written) == len(bags)
    for b in bags:
        src = _h5(job / "20x_256px_0px_overlap" / "features_uni_v1" / f"{b.slide_id}.h5")
        got = _h5(tmp_path / "out" / "features_uni_v1" / f"{b.slide_id}.h5")
        np.testing.assert_allclose(got[0], src[0], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got[1], src[1])
        _same_attrs(got[2], src[2])


def test_trident_several_encoders_are_listed(tmp_path, bags):
    job = write_trident_job(bags[:2], tmp_path / "job", encoder="uni_v1")
    write_trident_job(bags[:2], tmp_path / "job", encoder="conch_v15")
    with pytest.raises(StoreError, match="several feature folders") as e:
        import_features(job, FeatureStore(tmp_path / "store"))
    assert "features_uni_v1" in str(e.value) and "features_conch_v15" in str(e.value)


def test_export_of_extracted_slides_derives_the_attributes(tmp_path, bags):
    store = FeatureStore(tmp_path / "store")
    b = bags[0]
    store.write_slide(b.slide_id, b.features, b.coords, {"tile_size": 224, "extent_level0": 448, "mpp": 0.5,
                                                         "slide_mpp": 0.25, "backbone": "uni",
                                                         "extraction": {"tiling": {"mpp": 0.5}}})
    clam = export_features(store, tmp_path / "clam", progress=False)[0]
    _, _, a = _h5(clam)
    assert a["patch_level"] == 0 and a["patch_size"] == 448  # level-0 px read back the same tissue
    trident = export_features(store, tmp_path / "tri", fmt="trident", progress=False)[0]
    assert trident.parent.name == "features_uni"
    _, _, a = _h5(trident)
    assert a["patch_size"] == 224 and a["patch_size_level0"] == 448
    assert a["target_magnification"] == pytest.approx(20) and a["level0_magnification"] == pytest.approx(40)
    export_features(store, tmp_path / "clam", progress=False)  # existing files kept, not rewritten
    with pytest.raises(StoreError, match="lacks slide"):
        export_features(store, tmp_path / "clam", slides=["nope"], progress=False)


def test_manifest_without_paths_refused_where_pixels_are_needed(tmp_path, bags, caplog):
    manifest = write_manifest(bags[:4], tmp_path / "m.csv")
    m = load_manifest(manifest, "label", check_files=False)
    assert (m.df["path"] == "").all()
    with pytest.raises(ManifestError, match=r"row 1: slide 'slide_000' has no path.*import its features"):
        load_manifest(manifest, "label", check_files=True)
    assert cli.main(["extract", str(manifest), f"data.root={tmp_path}"]) != 0
    assert "has no path" in caplog.text
