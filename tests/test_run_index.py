"""``wsi runs``: every run folder with its status (complete / interrupted / failed) and metrics;
a fit that raises leaves ``failed.json``; W&B runs carry the configured group and job type."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import feature_cfg_overrides
from wsi_lightning import build, cli, config, run
from wsi_lightning.errors import WSIError
from wsi_lightning.run_index import index_runs


def test_runs_lists_complete_interrupted_and_failed(bag_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    runs = tmp_path / "runs"
    done = run.fit(config.load("abmil", feature_cfg_overrides(bag_data, runs, **{"trainer.max_epochs": 2})))
    stopped = done.run_dir.with_name("stopped")
    shutil.copytree(done.run_dir, stopped)
    (stopped / "metrics.json").unlink()  # as a fit killed after an epoch leaves it
    bad = feature_cfg_overrides(bag_data, runs, **{"data.store": tmp_path / "empty_store", "trainer.max_epochs": 1})
    with pytest.raises(WSIError):
        run.fit(config.load("mean_pool", bad))  # no slide files to extract from
    with caplog.at_level(logging.INFO):
        assert cli.main(["runs", str(runs)]) == 0
    df = pd.read_csv(runs / "runs.csv")
    by_status = df.set_index("status")
    assert sorted(df["status"]) == ["complete", "failed", "interrupted"]
    ok = by_status.loc["complete"]
    assert ok["experiment"] == "abmil" and ok["kind"] == "fit" and ok["seed"] == 0 and ok["epochs"] == 2
    assert ok["test/auroc"] == pytest.approx(done.metrics["test/auroc"])
    assert by_status.loc["interrupted", "run_dir"] == "abmil/stopped"
    failed = by_status.loc["failed"]
    assert failed["experiment"] == "mean_pool" and "Error" in failed["error"]
    assert any("1 complete, 1 failed, 1 interrupted" in r.getMessage() for r in caplog.records)
    run.predict(done.run_dir, bag_data, out=done.run_dir / "predict-all")
    kinds = index_runs(runs).set_index("run_dir")["kind"]
    assert kinds[f"abmil/{done.run_dir.name}/predict-all"] == "predict"


def test_runs_on_a_missing_folder_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert cli.main(["runs", str(tmp_path / "nope")]) == 2
    assert any("nope is not a folder" in r.getMessage() for r in caplog.records)


def test_wandb_group_and_job_type_reach_the_logger(tmp_path: Path):
    from lightning.pytorch.loggers import WandbLogger

    cfg = config.load("abmil", ["logger.wandb.mode=offline", "logger.wandb.group=table/x/demo",
                                "logger.wandb.job_type=ABMIL"])
    (w,) = [lg for lg in build.build_loggers(cfg, tmp_path) if isinstance(lg, WandbLogger)]
    assert w._wandb_init["group"] == "table/x/demo" and w._wandb_init["job_type"] == "ABMIL"
    assert w._log_model is False  # offline: checkpoints stay on disk, no artifacts
    online = config.load("abmil", ["logger.wandb.mode=online"])
    (w,) = [lg for lg in build.build_loggers(online, tmp_path / "on") if isinstance(lg, WandbLogger)]
    assert w._log_model is True
