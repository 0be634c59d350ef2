"""End-to-end fit/test on a fixture feature store, and the 2-process DDP test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import REPO, feature_cfg_overrides
from wsi_lightning import config, run


def _check_predictions(run_dir: Path, manifest: Path, stage: str) -> pd.DataFrame:
    pred = pd.read_csv(run_dir / f"{stage}_predictions.csv")
    assert pred["slide_id"].is_unique, f"{stage}: a slide appears twice"
    return pred


def test_fit_writes_run_folder_and_metrics_match_predictions(bag_data: Path, tmp_path: Path):
    cfg = config.load("abmil", feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 4}))
    res = run.fit(cfg)
    d = res.run_dir
    assert d.parent == tmp_path / "runs" / "abmil"
    for f in ("config.resolved.yaml", "metrics.json", "logs/metrics.csv", "test_predictions.csv",
              "val_predictions.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (d / f).exists(), f
    pred = _check_predictions(d, bag_data, "test")
    assert {"slide_id", "label", "pred", "prob_class0", "prob_class1"} <= set(pred.columns)
    # the logged AUROC is the AUROC of the written per-slide predictions
    auc = roc_auc_score(pred["label"] == "class1", pred["prob_class1"])
    assert res.metrics["test/auroc"] == pytest.approx(auc, abs=1e-4)
    assert json.loads((d / "metrics.json").read_text())["metrics"]["test/auroc"] == pytest.approx(auc, abs=1e-4)
    again = run.test(d)
    assert again.metrics["test/auroc"] == pytest.approx(res.metrics["test/auroc"], abs=1e-6)


def test_retest_standardises_with_the_checkpoints_statistics(bag_data: Path, tmp_path: Path, monkeypatch):
    """data.standardize (the default): wsi test takes the feature statistics from the checkpoint,
    never refits them on the slides the manifest calls train today."""
    from wsi_lightning.data.bags import FeatureScaler

    res = run.fit(config.load("abmil", feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 2})))
    assert res.metrics  # fitted with a scaler
    monkeypatch.setattr(FeatureScaler, "fit", classmethod(lambda *a, **k: pytest.fail("scaler refitted")))
    again = run.test(res.run_dir)
    assert again.metrics["test/auroc"] == pytest.approx(res.metrics["test/auroc"], abs=1e-6)


def test_wandb_offline_run_is_written(bag_data: Path, tmp_path: Path):
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{
        "logger.wandb.enabled": True, "logger.wandb.mode": "offline", "trainer.max_epochs": 1})
    res = run.fit(config.load("mean_pool", over))
    runs = list((res.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    # the next fit in this process (a table, a local sweep) gets its own W&B run
    import wandb

    assert wandb.run is None
    res2 = run.fit(config.load("mean_pool", over))
    runs2 = list((res2.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs2) == 1 and runs2[0].name.split("-")[-1] != runs[0].name.split("-")[-1]


def test_training_does_not_depend_on_what_data_preparation_draws(bag_data: Path, tmp_path: Path,
                                                                 monkeypatch):
    """A fit whose data preparation draws random numbers (extraction does, when the store is not
    cached yet) trains exactly like one that finds everything ready."""
    import torch

    from wsi_lightning import build

    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 2})
    cached = run.fit(config.load("abmil", over))
    built = build.build_datamodule

    def drawing(cfg):  # draws on its first call only, like an extraction (Lightning calls it again)
        dm, calls = built(cfg), []
        prepare = dm.prepare_data
        dm.prepare_data = lambda: (prepare(), calls or (torch.rand(10), np.random.rand(10)), calls.append(1))
        return dm

    monkeypatch.setattr(build, "build_datamodule", drawing)
    fresh = run.fit(config.load("abmil", over))
    a, b = (pd.read_csv(r.run_dir / "test_predictions.csv") for r in (cached, fresh))
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("exp", ["abmil", "max_pool"])
def test_attention_learns_the_fixture_task(bag_data: Path, tmp_path: Path, exp: str):
    cfg = config.load(exp, feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 30, "optim.lr": 1e-3}))
    assert run.fit(cfg).metrics["test/auroc"] >= 0.9


DDP_SCRIPT = """
import sys
from wsi_lightning import config, run
cfg = config.load("abmil", sys.argv[1:])
res = run.fit(cfg)
print("RUN_DIR", res.run_dir, flush=True)
"""


@pytest.mark.ddp
def test_ddp_two_processes_cover_every_slide_once(bag_data: Path, tmp_path: Path):
    """Validation and test predictions/metrics cover every slide exactly once under DDP."""
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{
        "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_epochs": 2,
        "data.split.val": 0.3, "data.split.test": 0.3})
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "WSI_RUN_DIR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script), *over], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RUN_DIR")))
    from wsi_lightning.manifest import load_manifest, patient_split

    m = load_manifest(bag_data, "label", check_files=False)
    splits = patient_split(m, val=0.3, test=0.3)
    assert len(splits["val"]) % 2 == 1 or len(splits["test"]) % 2 == 1, "want an uneven shard"
    for stage in ("val", "test"):
        pred = _check_predictions(run_dir, bag_data, stage)
        assert sorted(pred["slide_id"]) == splits[stage]
    pred = pd.read_csv(run_dir / "test_predictions.csv")
    auc = roc_auc_score(pred["label"] == "class1", pred["prob_class1"])
    logged = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert logged["test/auroc"] == pytest.approx(auc, abs=1e-4)
    # every loss and metric is the value over all slides: the same checkpoint tested in one
    # process gives the same numbers (val/test losses used to be rank 0's share alone)
    one = run.test(run_dir, overrides=["trainer.devices=1", "trainer.strategy=auto"]).metrics
    assert "test/loss" in logged and "test/loss_task" in logged
    assert logged.keys() == one.keys()
    for k, v in one.items():
        assert logged[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # val/loss (the checkpoint monitor) over the uneven 4 + 3 shard of the 7 validation slides:
    # the mean cross-entropy of the last epoch's written predictions
    assert len(splits["val"]) == 7
    val = pd.read_csv(run_dir / "val_predictions.csv")
    p_true = [row[f"prob_{row['label']}"] for _, row in val.iterrows()]
    ce = float(-np.log(np.asarray(p_true)).mean())
    hist = pd.read_csv(run_dir / "logs" / "metrics.csv").dropna(subset=["val/loss"])
    assert float(hist["val/loss"].iloc[-1]) == pytest.approx(ce, rel=1e-4)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path, monkeypatch):
    """Two `wsi fit` started together used to share <timestamp>/ (metrics interleaved)."""
    from omegaconf import OmegaConf

    monkeypatch.setattr(run.time, "strftime", lambda fmt: "20260101-000000")
    cfg = OmegaConf.create({"paths": {"runs": str(tmp_path)}, "name": "abmil"})
    dirs = [run.new_run_dir(cfg) for _ in range(3)]
    assert [d.name for d in dirs] == ["20260101-000000", "20260101-000000-1", "20260101-000000-2"]
    assert all(d.is_dir() for d in dirs)
