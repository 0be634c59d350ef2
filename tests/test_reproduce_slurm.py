"""``wsi reproduce --launcher slurm|submitit-local``: the table's runs as submitit jobs give the
table ``--jobs 1`` gives; settings and missing prerequisites are named."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_reproduce import _spec
from wsi_lightning import cli, reproduce
from wsi_lightning.errors import ConfigError, WSIError


def test_one_submitit_job_gives_the_table_of_one_process(bag_data: Path, tmp_path: Path):
    """The launcher end to end, small: one row, one seed, one job (a fresh process)."""
    pytest.importorskip("submitit")
    spec = yaml.safe_load(_spec(tmp_path, bag_data).read_text())
    spec["rows"], spec["seeds"] = spec["rows"][1:], [0]
    spec.pop("compare_to")
    path = tmp_path / "one_row.yaml"
    path.write_text(yaml.safe_dump(spec))
    tables = [reproduce.run_table(str(path), dataset="tiny", runs=tmp_path / k, results=tmp_path / f"r_{k}",
                                  extra_overrides=["trainer.num_threads=1"], launcher=k)
              for k in ("local", "submitit-local")]
    a, b = (pd.read_csv(t.with_suffix(".csv")) for t in tables)
    pd.testing.assert_frame_equal(a, b)
    assert len(list((tmp_path / "submitit-local").rglob("_submitit/*/*_result.pkl"))) == 1


@pytest.mark.slow
def test_submitit_jobs_give_the_table_of_one_process(bag_data: Path, tmp_path: Path):
    """submitit's local executor: every (row, seed) a job of its own (a fresh process, as on a
    node), two at a time, the store prepared by a first job; the same table as --jobs 1."""
    pytest.importorskip("submitit")
    spec = _spec(tmp_path, bag_data)
    one = reproduce.run_table(str(spec), dataset="tiny", seeds=[1], runs=tmp_path / "one", results=tmp_path / "r1",
                              extra_overrides=["trainer.num_threads=1"])
    jobs = reproduce.run_table(str(spec), dataset="tiny", seeds=[1], runs=tmp_path / "sub", results=tmp_path / "r2",
                               extra_overrides=["trainer.num_threads=1"], jobs=2, launcher="submitit-local",
                               slurm={"prepare": "job", "time_min": 20})
    a, b = (pd.read_csv(p.with_suffix(".csv")) for p in (one, jobs))
    pd.testing.assert_frame_equal(a, b)
    logs = sorted((tmp_path / "sub" / "reproduce" / "tiny" / "tiny" / "_submitit").glob("*/*_log.out"))
    assert len(logs) == 3  # the preparation job and the 2 runs
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "sub").rglob("metrics.json"))
    again = reproduce.run_table(str(spec), dataset="tiny", seeds=[1], runs=tmp_path / "sub", results=tmp_path / "r2",
                                extra_overrides=["trainer.num_threads=1"], launcher="submitit-local")
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "sub").rglob("metrics.json")) == stamps  # all complete
    pd.testing.assert_frame_equal(pd.read_csv(again.with_suffix(".csv")), a)


def test_slurm_settings_are_checked(bag_data: Path, tmp_path: Path):
    spec = yaml.safe_load(_spec(tmp_path, bag_data).read_text())
    spec["slurm"] = {"gpus": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"bad.yaml: slurm: unknown key 'gpus'; valid: \['partition'"):
        reproduce.load_spec(str(bad))
    spec["slurm"] = {"gpus_per_job": 1, "time_min": 30}
    bad.write_text(yaml.safe_dump(spec))
    s = reproduce.SlurmSettings.merged(reproduce.load_spec(str(bad))["slurm"], {"time_min": 90, "partition": None},
                                       "spec")
    assert (s.gpus_per_job, s.time_min, s.partition) == (1, 90, None)
    with pytest.raises(ConfigError, match=r"--slurm-\* options: gpus_per_job=2; expected 0 or 1"):
        reproduce.SlurmSettings.merged(None, {"gpus_per_job": 2}, "spec")
    with pytest.raises(ConfigError, match="prepare='later'"):
        reproduce.SlurmSettings.merged({"prepare": "later"}, None, "spec")


def test_slurm_without_sbatch_or_submitit_names_the_fix(bag_data: Path, tmp_path: Path, monkeypatch,
                                                      caplog: pytest.LogCaptureFixture):
    import sys

    spec = _spec(tmp_path, bag_data)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    args = ["reproduce", str(spec), "--data", "tiny", "--launcher", "slurm", "--results", str(tmp_path / "r"),
            f"paths.runs={tmp_path / 'runs'}"]
    with caplog.at_level(logging.ERROR):
        assert cli.main(args) == 2
    assert any("no sbatch on PATH" in r.getMessage() and "--launcher submitit-local" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))  # nothing ran
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(WSIError, match=r"needs the submitit package: pip install submitit==1\.5\.4"):
        reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "runs", launcher="slurm")


def test_runs_of_a_still_running_submission_are_refused(bag_data: Path, tmp_path: Path, monkeypatch):
    """The submitting process was stopped while its jobs run on: a second submission of the
    same runs would write into their folders."""
    import json

    folder = tmp_path / "_submitit"
    folder.mkdir()
    run_dir = tmp_path / "row" / "seed0"
    (folder / "jobs.json").write_text(json.dumps({str(run_dir.resolve()): "123_0"}))
    job = reproduce.Job("t", "row", 0, None, run_dir, False)  # type: ignore[arg-type]
    monkeypatch.setattr(reproduce, "_slurm_state", lambda folder, job_id: "RUNNING")
    with pytest.raises(WSIError, match=r"SLURM job\(s\) \['123_0'\] .* still run the same runs"):
        reproduce._refuse_active(folder, [job], "slurm")
    monkeypatch.setattr(reproduce, "_slurm_state", lambda folder, job_id: "COMPLETED")
    reproduce._refuse_active(folder, [job], "slurm")


def _child_of(pid: int) -> int:
    """The process a submitit local job's controller ``pid`` started (the job's task)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            return int(stat.parent.name)
    raise AssertionError(f"no child process of {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's process through /proc")
def test_a_preempted_job_is_requeued_and_resumes_its_fit(bag_data: Path, tmp_path: Path):
    """A SLURM time-out or preemption signal (USR2, sent here through submitit's local job):
    the job is requeued and its fit resumes from last.ckpt, ending as an uninterrupted fit."""
    import json
    import time

    from omegaconf import OmegaConf

    from tests.conftest import feature_cfg_overrides
    from wsi_lightning import config, run

    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 20, "data.batch_size": 2,
                                                                  "method.dropout": 0.25, "trainer.num_threads": 1})
    whole = run.fit(config.load("abmil", over))
    ex = reproduce._executor("submitit-local", reproduce.SlurmSettings(time_min=20), tmp_path / "jobs", "t")
    run_dir = tmp_path / "preempted"
    job = ex.submit(reproduce._TableFit(), OmegaConf.to_yaml(config.load("abmil", over)), str(run_dir), False)
    t0 = time.time()
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() - t0 < 300:
        time.sleep(0.2)
    os.kill(_child_of(int(job.job_id)), signal.SIGUSR2)  # what SLURM sends before a time limit or a preemption
    metrics = job.result()
    assert "Requeued job" in job.stderr() or "Requeued job" in job.stdout()
    assert "resuming" in (job.stdout() or "") + (job.stderr() or "")
    saved = json.loads((whole.run_dir / "metrics.json").read_text())["metrics"]
    assert metrics.keys() == saved.keys()
    for k, v in saved.items():
        assert metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
