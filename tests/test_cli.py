from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import REPO, feature_cfg_overrides
from wsi_lightning.cli import main
from wsi_lightning.features.store import FeatureStore


def test_help_is_lazy_and_quick():
    code = "import sys, wsi_lightning.cli as c; print(sorted(m for m in ('torch','lightning','openslide') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "wsi_lightning", "--help"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "demo-data" in res.stdout and "import-features" in res.stdout


def test_fit_then_test_from_cli(bag_data: Path, tmp_path: Path):
    assert main(["fit", "abmil", *feature_cfg_overrides(bag_data, tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs" / "abmil").iterdir())
    assert main(["test", str(run_dir), "--ckpt", "last"]) == 0


def test_config_errors_are_reported_not_raised(bag_data: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "abmil", "trainer.max_epoch=1"]) == 2
        assert "did you mean 'trainer.max_epochs'" in caplog.text
        assert main(["fit", "abmil", "method.name=not_a_method"]) == 2
        assert "unknown method 'not_a_method'" in caplog.text
        assert main(["test", str(tmp_path)]) == 2
        assert "not a run folder" in caplog.text


def test_import_features_cli(tmp_path: Path):
    src = tmp_path / "h5"
    src.mkdir()
    for sid in ("a", "b"):
        with h5py.File(src / f"{sid}.h5", "w") as f:
            f["features"] = np.random.rand(7, 12).astype(np.float32)
            f["coords"] = np.arange(14).reshape(7, 2)
    assert main(["import-features", str(src), "--store", str(tmp_path / "store")]) == 0
    store = FeatureStore(tmp_path / "store")
    assert store.complete_slides() == ["a", "b"] and store.read("a")[0].shape == (7, 12)


def test_config_errors_fail_before_any_data_work(tmp_path: Path, monkeypatch):
    """A bad method name must not first generate the demo data set."""
    import wsi_lightning.build as build

    def boom(*a, **k):
        raise AssertionError("data preparation started before the config was checked")

    monkeypatch.setattr(build, "build_datamodule", boom)
    assert main(["fit", "abmil", "method.name=not_a_method", f"paths.runs={tmp_path}"]) == 2
    assert main(["fit", "abmil", "callbacks=[{name: nope}]", f"paths.runs={tmp_path}"]) == 2
