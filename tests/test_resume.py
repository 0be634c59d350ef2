"""Resume: an interrupted fit continues from its last epoch and ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest

from tests.conftest import REPO, feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.errors import WSIError


class _Crash(L.Callback):
    """Raise in the middle of epoch ``epoch`` (after one training batch of it)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")


def _over(bag_data: Path, runs: Path, **extra: object) -> list[str]:
    # dropout and a shuffled, batched loader: the resumed epochs must draw what the
    # uninterrupted run drew (weights, order, dropout masks)
    return feature_cfg_overrides(bag_data, runs, **{"trainer.max_epochs": 4, "data.batch_size": 2,
                                                    "method.dropout": 0.25, **extra})


def _outputs(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    return json.loads((run_dir / "metrics.json").read_text())["metrics"], pd.read_csv(run_dir / "test_predictions.csv")


def test_resume_after_a_crash_equals_an_uninterrupted_run(bag_data: Path, tmp_path: Path):
    whole = run.fit(config.load("abmil", _over(bag_data, tmp_path / "a")))
    cfg = config.load("abmil", _over(bag_data, tmp_path / "b"))
    run_dir = run.new_run_dir(cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.fit(cfg, run_dir=run_dir, extra_callbacks=[_Crash(epoch=2)])
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "metrics.json").exists()
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # last finished epoch
    resumed = run.resume(run_dir, ["trainer.num_threads=1"])  # how it runs may change
    assert resumed.run_dir == run_dir
    m_whole, p_whole = _outputs(whole.run_dir)
    m_res, p_res = _outputs(run_dir)
    assert m_res.keys() == m_whole.keys()
    for k, v in m_whole.items():
        assert m_res[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    pd.testing.assert_frame_equal(p_res, p_whole, rtol=1e-6)
    # the epoch history survives the resume: one validation row per epoch, as uninterrupted
    log_whole = pd.read_csv(whole.run_dir / "logs" / "metrics.csv")
    log_res = pd.read_csv(run_dir / "logs" / "metrics.csv")
    val = [sorted(m.dropna(subset=["val/loss"])["epoch"]) for m in (log_whole, log_res)]
    assert val[0] == val[1] == [0, 1, 2, 3]
    assert len(log_res) == len(log_whole)


def test_last_checkpoint_is_the_last_epoch_not_the_best(bag_data: Path, tmp_path: Path):
    """With save_last on the monitored checkpoint, last.ckpt was refreshed only on improvement."""
    import torch

    # lr 0: val/loss never improves after epoch 0, so best stays at epoch 0
    res = run.fit(config.load("abmil", _over(bag_data, tmp_path / "runs", **{"optim.lr": 0.0})))
    ck = res.run_dir / "checkpoints"
    assert torch.load(ck / "last.ckpt", weights_only=True)["epoch"] == 3
    assert torch.load(ck / "best.ckpt", weights_only=True)["epoch"] == 0


def test_resume_refuses_what_would_change_the_run(bag_data: Path, tmp_path: Path):
    res = run.fit(config.load("abmil", _over(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 1})))
    with pytest.raises(WSIError, match="finished"):
        run.resume(res.run_dir)
    (res.run_dir / "metrics.json").unlink()
    with pytest.raises(WSIError, match=r"\['optim.lr'\] change what the run computes"):
        run.resume(res.run_dir, ["optim.lr=0.1"])
    with pytest.raises(WSIError, match="run of 'abmil', not of 'mean_pool'"):
        run.resume(res.run_dir, exp="mean_pool")
    with pytest.raises(WSIError, match="not a run folder"):
        run.resume(tmp_path)


def test_wsi_test_writes_under_test_ckpt_and_keeps_the_fit_files(bag_data: Path, tmp_path: Path):
    res = run.fit(config.load("abmil", _over(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 2})))
    d = res.run_dir
    before = {f: (d / f).read_bytes() for f in ("metrics.json", "test_predictions.csv")}
    again = run.test(d, ckpt="last")
    assert again.run_dir == d / "test-last"
    assert (d / "test-last" / "test_predictions.csv").exists() and (d / "test-last" / "metrics.json").exists()
    assert {f: (d / f).read_bytes() for f in before} == before
    by_path = run.test(d, ckpt=str(d / "checkpoints" / "best.ckpt"))
    assert by_path.run_dir == d / "test-best"
    assert by_path.metrics["test/auroc"] == pytest.approx(res.metrics["test/auroc"], abs=1e-6)
    with pytest.raises(WSIError, match="--ckpt takes best, last or a .ckpt file"):
        run.test(d, ckpt="nope")


KILL_SCRIPT = """
import sys, time
import lightning as L
from wsi_lightning import config, run

class Slow(L.Callback):  # a step slow enough to be killed in the middle of epoch 2
    def on_train_batch_end(self, trainer, *a):
        if trainer.current_epoch >= 2:
            print("EPOCH2", flush=True)
            time.sleep(30)

cfg = config.load("abmil", sys.argv[1:])
run_dir = run.new_run_dir(cfg)
print("RUN_DIR", run_dir, flush=True)
run.fit(cfg, run_dir=run_dir, extra_callbacks=[Slow()])
"""


@pytest.mark.slow
def test_kill_9_mid_epoch_then_cli_resume(bag_data: Path, tmp_path: Path):
    """The acceptance scenario: SIGKILL a CPU fit mid-epoch, `wsi fit EXP --resume RUN_DIR`."""
    whole = run.fit(config.load("abmil", _over(bag_data, tmp_path / "a")))
    script = tmp_path / "fit.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    over = _over(bag_data, tmp_path / "b")
    proc = subprocess.Popen([sys.executable, str(script), *over], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)
    run_dir, t0 = None, time.time()
    for line in proc.stdout:
        if line.startswith("RUN_DIR"):
            run_dir = Path(line.split(" ", 1)[1].strip())
        if line.startswith("EPOCH2"):
            break
        assert time.time() - t0 < 240
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_dir is not None and not (run_dir / "metrics.json").exists()
    from wsi_lightning.cli import main

    assert main(["fit", "abmil", "--resume", str(run_dir), "trainer.enable_progress_bar=false"]) == 0
    m_whole, p_whole = _outputs(whole.run_dir)
    m_res, p_res = _outputs(run_dir)
    for k, v in m_whole.items():
        assert m_res[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    pd.testing.assert_frame_equal(p_res, p_whole, rtol=1e-6)


def test_resumed_fit_logs_into_the_same_wandb_run(bag_data: Path, tmp_path: Path):
    over = _over(bag_data, tmp_path / "runs", **{"logger.wandb.enabled": True, "logger.wandb.mode": "offline",
                                                 "trainer.max_epochs": 3})
    cfg = config.load("abmil", over)
    run_dir = run.new_run_dir(cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.fit(cfg, run_dir=run_dir, extra_callbacks=[_Crash(epoch=1)])
    run.resume(run_dir)
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {(run_dir / "wandb-id.txt").read_text().strip()}
