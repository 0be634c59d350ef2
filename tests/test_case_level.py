"""Patient-level training end to end (``data.bag_level=case``): ABMIL learns a task where a case is
positive when any of its slides carries the signal, metrics and predictions are per case,
attention.csv is split back into slides, and two DDP processes cover every case once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import REPO, feature_cfg_overrides, make_case_bags
from wsi_lightning import config, run
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest, patient_split

log = logging.getLogger(__name__)


def _cases(manifest: Path, split: dict[str, list[str]], stage: str) -> dict[str, list[str]]:
    """{case: its slides} of a split, slides in manifest order."""
    df = pd.read_csv(manifest, dtype=str)
    df = df[df["slide_id"].isin(split[stage])]
    return {c: list(g["slide_id"]) for c, g in df.groupby("case_id", sort=True)}


def _check_case_predictions(run_dir: Path, manifest: Path, split: dict, stage: str) -> pd.DataFrame:
    pred = pd.read_csv(run_dir / f"{stage}_predictions.csv", dtype={"case_id": str})
    assert list(pred.columns) == ["case_id", "slide_ids", "label", "pred", "prob_class0", "prob_class1"]
    cases = _cases(manifest, split, stage)
    assert list(pred["case_id"]) == sorted(cases), f"{stage}: one row per case, each case once"
    assert [s.split(";") for s in pred["slide_ids"]] == [cases[c] for c in pred["case_id"]]
    labels = pd.read_csv(manifest, dtype=str).groupby("case_id")["label"].first()
    assert list(pred["label"]) == list(labels[pred["case_id"]])
    return pred


def test_abmil_learns_case_bags_with_case_level_metrics(tmp_path: Path):
    manifest = make_case_bags(tmp_path / "cases", n_cases=40)
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "data.bag_level": "case", "trainer.max_epochs": 8, "optim.lr": 1e-3,
        "callbacks": "[{name: attention_logger}, {name: mechanism}]"})
    res = run.fit(config.load("abmil", over))
    split = patient_split(load_manifest(manifest, "label", check_files=False), val=0.25, test=0.25)
    for stage in ("val", "test"):
        pred = _check_case_predictions(res.run_dir, manifest, split, stage)
    auc = roc_auc_score(pred["label"] == "class1", pred["prob_class1"])
    logged = json.loads((res.run_dir / "metrics.json").read_text())["metrics"]
    assert logged["test/auroc"] == pytest.approx(auc, abs=1e-4)  # the metric is over cases
    log.warning("case-level ABMIL: test AUROC %.3f over %d cases", auc, len(pred))
    assert auc >= 0.9, f"case-level ABMIL test AUROC {auc:.3f}"
    assert logged["test/slides_left_out"] == 0.0

    att = pd.read_csv(res.run_dir / "attention" / "attention.csv", dtype={"slide_id": str, "case_id": str})
    assert list(att.columns) == ["slide_id", "case_id", "map", "tile", "x", "y", "extent", "attention",
                                 "normalised"]
    test_cases = _cases(manifest, split, "test")
    assert sorted(att["slide_id"].unique()) == sorted(split["test"]), "rows per slide, every test slide"
    case_of = {s: c for c, slides in test_cases.items() for s in slides}
    store = FeatureStore(manifest.parent / "store")
    for sid, g in att.groupby("slide_id"):
        assert (g["case_id"] == case_of[sid]).all()
        coords = store.read_coords(sid)  # tile = row in the slide's store entry, x, y its own frame
        assert list(g["tile"]) == list(range(len(coords)))
        np.testing.assert_array_equal(g[["x", "y"]].to_numpy(), coords[g["tile"].to_numpy()])
        assert (g["extent"] == 112).all()
    np.testing.assert_allclose(att.groupby("case_id")["attention"].sum(), 1.0, atol=1e-4)  # over the case
    per_case = att.groupby("case_id")["normalised"]  # percentile over the case's tiles
    assert (per_case.min() == 0.0).all() and (per_case.max() == 1.0).all()
    # the planted signal: the carrier slide of each positive test case holds its top tile
    df = pd.read_csv(manifest, dtype={"slide_id": str})
    carriers = set(df.loc[df["carrier"], "slide_id"]) & set(split["test"])
    top = att.loc[att.groupby("case_id")["attention"].idxmax(), "slide_id"]
    assert len(carriers & set(top)) >= len(carriers) - 1


DDP_SCRIPT = """
import sys
from wsi_lightning import config, run
res = run.fit(config.load("abmil", sys.argv[1:]))
print("RUN_DIR", res.run_dir, flush=True)
"""


@pytest.mark.ddp
def test_ddp_two_processes_cover_every_case_once(tmp_path: Path):
    """Unpadded validation / test shares of cases: every case once in the predictions, and the
    metrics equal a one-process test of the same checkpoint."""
    manifest = make_case_bags(tmp_path / "cases", n_cases=11)
    split = patient_split(load_manifest(manifest, "label", check_files=False), val=0.25, test=0.25)
    assert len(_cases(manifest, split, "test")) == 3, "want an uneven shard"
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "data.bag_level": "case", "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_epochs": 2,
        "callbacks": "[{name: attention_logger}]"})
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "WSI_RUN_DIR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script), *over], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RUN_DIR")))
    for stage in ("val", "test"):
        _check_case_predictions(run_dir, manifest, split, stage)
    att = pd.read_csv(run_dir / "attention" / "attention.csv", dtype={"slide_id": str})
    store = FeatureStore(manifest.parent / "store")
    assert att.groupby("slide_id").size().to_dict() == {s: store.num_instances(s) for s in split["test"]}
    logged = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    one = run.test(run_dir, overrides=["trainer.devices=1", "trainer.strategy=auto"]).metrics
    for k, v in one.items():
        assert logged[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
