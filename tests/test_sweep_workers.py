"""Offline sweep workers on one Optuna study: spawned workers in parallel, --join, --resume of
trials left running, the CLI flags."""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tests.conftest import feature_cfg_overrides
from wsi_lightning import cli, sweep, sweep_space
from wsi_lightning.errors import WSIError

LOG_LR = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}


def _write_sweep(tmp_path: Path, **spec: object) -> Path:
    doc = {"experiment": "abmil", "method": "random", "count": 2, "parameters": LOG_LR,
           "metric": {"name": "val/loss", "goal": "minimize"}}
    doc.update(spec)
    path = tmp_path / "workers_under_test.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _load_study(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal"))))


def _overlap(a: sweep.TrialRecord, b: sweep.TrialRecord) -> bool:
    return a.started < b.ended and b.started < a.ended


def test_two_workers_share_one_study_run_at_once_and_rank(bag_data: Path, tmp_path: Path):
    path = _write_sweep(tmp_path, count=4)
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 2, "seed": 0})
    records = sweep.run_sweep(path, mode="offline", overrides=over, workers=2)

    assert sorted(r.name for r in records) == [f"trial_{i:03d}" for i in range(4)]
    assert all(r.state == "finished" and (r.run_dir / "metrics.json").exists() for r in records)
    workers = {r.worker for r in records}
    assert len(workers) == 2 and sweep.WORKER not in workers  # two spawned processes ran them
    assert any(_overlap(a, b) for a in records for b in records if a.worker != b.worker)
    sweep_dir = records[0].run_dir.parent
    study = _load_study(sweep_dir, path.stem)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.user_attrs["name"] for t in study.trials) == sorted(r.name for r in records)
    # trial k's proposal depends on (seed, k) only, whichever worker asked for it
    space = sweep_space.search_space(LOG_LR, "test")
    for r in records:
        k = int(r.name.split("_")[1])
        alone = optuna.create_study(sampler=sweep_space.make_sampler("random", space, 0, k))
        assert r.params == alone.ask(space.distributions).params, r.name
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [row["trial"] for row in rows] == [r.name for r in records]
    assert [float(row["val/loss"]) for row in rows] == sorted(r.metric for r in records)
    assert {row["worker"] for row in rows} == workers and all(row["started"] < row["ended"] for row in rows)


def _fake_trial(sweep_cfg, params, name, sweep_dir, overrides, trial, resume=False):
    """A trial without training (its value: the learning rate)."""
    _fake_trial.calls.append((name, params))
    return sweep.TrialRecord(name, dict(params), params["optim.lr"], sweep_dir / name, "finished",
                             started=sweep._now(), ended=sweep._now(), worker=sweep.WORKER)


@pytest.fixture
def fake_trials(monkeypatch: pytest.MonkeyPatch) -> list:
    _fake_trial.calls = []
    monkeypatch.setattr(sweep, "_guarded_trial", _fake_trial)
    return _fake_trial.calls


def test_join_adds_trials_up_to_the_new_total(tmp_path: Path, fake_trials: list):
    path = _write_sweep(tmp_path)
    first = {r.name: r for r in sweep.run_sweep(path, mode="offline", runs_dir=tmp_path / "runs")}
    sweep_dir = next(iter(first.values())).run_dir.parent
    assert sorted(first) == ["trial_000", "trial_001"]
    joined = {r.name: r for r in sweep.run_sweep(path, mode="offline", join=sweep_dir, count=3)}
    assert sorted(joined) == ["trial_000", "trial_001", "trial_002"]
    assert [c[0] for c in fake_trials] == ["trial_000", "trial_001", "trial_002"]  # none ran twice
    assert all(joined[n].params == first[n].params for n in first)
    assert sweep.run_sweep(path, mode="offline", join=sweep_dir) and len(fake_trials) == 3  # total reached
    with pytest.raises(WSIError, match="would change the trials"):
        sweep.run_sweep(path, mode="offline", join=sweep_dir, overrides=["optim.weight_decay=0.1"])


def test_resume_reruns_a_trial_left_running_by_a_dead_worker_not_a_live_one(tmp_path: Path, fake_trials: list):
    path = _write_sweep(tmp_path, count=1)
    sweep_dir = sweep.run_sweep(path, mode="offline", runs_dir=tmp_path / "runs")[0].run_dir.parent
    resolved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    study = sweep.open_study(sweep_dir, resolved)
    space = sweep_space.search_space(LOG_LR, "test")
    trial = study.ask(space.distributions)  # what a worker holds while its trial trains
    trial.set_user_attr("name", "trial_001")
    trial.set_user_attr("worker", sweep.WORKER)  # this process: alive
    with pytest.raises(WSIError, match="still runs trial_001.*--join"):
        sweep.run_sweep(path, mode="offline", resume=sweep_dir, count=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    records = {r.name: r for r in sweep.run_sweep(path, mode="offline", resume=sweep_dir, count=2)}
    assert fake_trials[1:] == [("trial_001", trial.params)]  # the same parameters, run again
    assert sorted(records) == ["trial_000", "trial_001"] and records["trial_001"].state == "finished"
    states = [t.state for t in _load_study(sweep_dir, path.stem).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]  # the dead attempt is kept, as failed


def test_cli_sweep_flags(tmp_path: Path):
    args = cli.make_parser().parse_args(["sweep", "abmil_bayes", "--offline", "--workers", "2", "--join", "d"])
    assert (args.workers, args.join, args.resume, args.offline) == (2, "d", None, True)
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["sweep", "abmil_bayes", "--resume", "a", "--join", "b"])
    with pytest.raises(Exception, match=r"--workers is for offline sweeps"):
        sweep.run_sweep(_write_sweep(tmp_path), mode="online", workers=2, runs_dir=tmp_path / "runs")
