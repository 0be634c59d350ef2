"""--skip-errors behaves the same in `wsi extract` and `wsi fit`: bad slides are recorded once,
counted in the last line, and a shrunken test split is recorded in metrics.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from wsi_lightning.cli import main
from wsi_lightning.demo.dataset import make_demo_dataset

OVER = ["tiling.tile_size=64", "tiling.mpp=1.0", "features.backbone=demo_cnn", "features.pretrained=false",
        "features.num_workers=0", "features.accelerator=cpu", "features.batch_size=32"]


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("skip")
    demo = make_demo_dataset(root / "demo", n_slides=8, seed=5, workers=1, size_um=768.0)
    df = pd.read_csv(demo)
    df["path"] = [str(demo.parent / p) for p in df["path"]]
    df.loc[1, "path"] = str(root / "missing.tiff")  # a slide file that does not exist
    # an explicit split: two slides of each class train, one validates, the rest (the missing
    # slide among them) test
    rank = df.groupby("label").cumcount()
    df["split"] = ["train" if r < 2 else "val" if r == 2 else "test" for r in rank]
    if df.loc[1, "split"] != "test":
        df.loc[1, "split"], df.loc[df.index[(df["label"] == df.loc[1, "label"]) & (rank == 3)][0], "split"] = \
            "test", df.loc[1, "split"]
    df.loc[df["case_id"] == df.loc[1, "case_id"], "split"] = "test"  # a case stays in one split
    path = root / "m.csv"
    df.to_csv(path, index=False)
    return path


def test_extract_skip_errors_skips_a_missing_file_and_counts_failures(bad_manifest: Path, tmp_path: Path, caplog):
    """A missing file used to abort `wsi extract --skip-errors` (the manifest check ran first)."""
    store = tmp_path / "store"
    assert main(["extract", str(bad_manifest), "--store", str(store), *OVER]) == 2  # without: a named error
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsi_lightning"):
        assert main(["extract", str(bad_manifest), "--store", str(store), "--skip-errors", *OVER]) == 0
    last = [r.getMessage() for r in caplog.records if "extracted" in r.getMessage()][-1]
    assert "1 slide(s) failed" in last and "errors.csv" in last
    sid = pd.read_csv(bad_manifest)["slide_id"][1]
    assert list(pd.read_csv(store / "errors.csv")["slide_id"]) == [sid]


def test_fit_skip_errors_tries_a_bad_slide_once_and_records_the_test_loss(bad_manifest: Path, tmp_path: Path, caplog):
    """`wsi fit` used to retry a bad slide three times (prepare_data from run.fit, trainer.fit and
    trainer.test); slides missing from the test split were only a warning."""
    sid = pd.read_csv(bad_manifest)["slide_id"][1]
    runs = tmp_path / "runs"
    over = [f"data.manifest={bad_manifest}", f"data.store={tmp_path / 'store'}", "features.skip_errors=true",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "logger.wandb.enabled=false", f"paths.runs={runs}", "data.split.val=0.25", "data.split.test=0.25",
            *OVER]
    with caplog.at_level(logging.INFO):
        assert main(["fit", "abmil", *over]) == 0
    failures = [r for r in caplog.records if "failed for slide" in r.getMessage() and sid in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    metrics = json.loads(next(runs.glob("abmil/*/metrics.json")).read_text())["metrics"]
    test_ids = pd.read_csv(next(runs.glob("abmil/*/test_predictions.csv")))["slide_id"].tolist()
    assert sid not in test_ids and metrics["test/slides_left_out"] == 1.0
    assert any("the test split lost 1" in r.getMessage() for r in caplog.records)
