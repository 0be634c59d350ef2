"""Sweeps: validation, the offline agent (an Optuna study: grid, bayes) on a fixture store,
hyperband pruning, the online agent's plumbing, resume. Workers and the search space:
tests/test_sweep_workers.py, tests/test_sweep_space.py."""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import feature_cfg_overrides
from wsi_lightning import sweep, sweep_space
from wsi_lightning.errors import ConfigError
from wsi_lightning.sweep import TrialMonitor

LR_VALUES = [1.0e-4, 1.0e-3, 1.0e-2]


def _write_sweep(tmp_path: Path, **spec: object) -> Path:
    doc = {"experiment": "abmil", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
           "parameters": {"optim.lr": {"values": LR_VALUES}}}
    doc.update(spec)
    path = tmp_path / "sweep_under_test.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("name", sweep.list_sweeps())
def test_every_sweep_file_validates(name: str):
    s = sweep.load_sweep(name)
    assert set(sweep.wandb_part(s)) & set(sweep.OUR_KEYS) == set()


def test_offline_grid_sweep_runs_ranks_and_writes_summary(bag_data: Path, tmp_path: Path):
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 2})
    records = sweep.run_sweep(_write_sweep(tmp_path), mode="offline", overrides=over)

    assert len(records) == 3  # the grid is exhausted after 3 trials (no count given)
    assert sorted(r.params["optim.lr"] for r in records) == sorted(LR_VALUES)
    sweep_dir = records[0].run_dir.parent
    assert sweep_dir.parent.parent == tmp_path / "runs" / "sweeps"
    assert len({r.run_dir for r in records}) == 3
    for r in records:
        assert r.state == "finished"
        assert json.loads((r.run_dir / "metrics.json").read_text())["metrics"] == pytest.approx(r.metrics)
        assert yaml.safe_load((r.run_dir / "config.resolved.yaml").read_text())["optim"]["lr"] == r.params["optim.lr"]
        # the trial's value is its best validation epoch, as the run's own CSV log has it
        logged = pd.read_csv(r.run_dir / "logs" / "metrics.csv")["val/loss"].dropna()
        assert len(logged) == 2 and r.metric == pytest.approx(logged.min(), abs=1e-6)
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [row["trial"] for row in rows] == [r.name for r in records]
    values = [float(row["val/loss"]) for row in rows]
    assert values == sorted(values) and [int(row["rank"]) for row in rows] == [1, 2, 3]
    resolved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert resolved["experiment"] == "abmil" and resolved["mode"] == "offline"


def test_bayes_proposes_values_within_log_bounds(bag_data: Path, tmp_path: Path):
    path = _write_sweep(tmp_path, method="bayes", count=2, parameters={
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}})
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 1})
    records = sweep.run_sweep(path, mode="offline", overrides=over)
    assert len(records) == 2
    lrs = [r.params["optim.lr"] for r in records]
    assert all(isinstance(v, float) and 1e-5 <= v <= 1e-2 for v in lrs) and lrs[0] != lrs[1]
    assert all(r.metric is not None and math.isfinite(r.metric) for r in records)


def test_metric_that_is_never_logged_fails_after_the_first_trial(bag_data: Path, tmp_path: Path):
    path = _write_sweep(tmp_path, metric={"name": "val/aucroc", "goal": "maximize"})
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 1})
    with pytest.raises(ConfigError, match=r"metric\.name 'val/aucroc' was not logged.*'val/auroc'"):
        sweep.run_sweep(path, mode="offline", overrides=over)


def test_proposals_are_reproducible_and_independent_of_training_seeds():
    space = sweep_space.search_space({"optim.lr": {"min": 0.0, "max": 1.0}}, "test")

    def draws(seed: int) -> list[float]:
        study, out = optuna.create_study(), []
        for slot in range(3):
            study.sampler = sweep_space.make_sampler("random", space, seed, slot)
            trial = study.ask(space.distributions)
            out.append(trial.params["optim.lr"])
            study.tell(trial, 0.5)
            random.seed(0)  # what a trial's seed_everything does between proposals
            np.random.seed(0)
            torch.manual_seed(0)
        return out

    assert draws(7) == draws(7)
    assert len(set(draws(7))) == 3 and draws(7) != draws(8)


def test_unknown_parameter_key_lists_valid_keys(tmp_path: Path):
    path = _write_sweep(tmp_path, parameters={"optim.lrr": {"values": [1e-3]}})
    with pytest.raises(ConfigError, match=r"sweep_under_test\.yaml \(parameters\).*did you mean "
                                          r"'optim\.lr'.*valid keys under 'optim'"):
        sweep.load_sweep(path)
    path = _write_sweep(tmp_path, parameters={"method.gatd": {"values": [True]}})
    with pytest.raises(ConfigError, match=r"sweep_under_test\.yaml.*method\.gatd.*valid keys.*gated"):
        sweep.load_sweep(path)


def test_bad_experiment_method_metric_and_overrides(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"sweep_under_test\.yaml: key 'experiment' = 'nope'.*abmil"):
        sweep.load_sweep(_write_sweep(tmp_path, experiment="nope"))
    with pytest.raises(ConfigError, match=r"key 'method' = 'hyperopt'.*grid"):
        sweep.load_sweep(_write_sweep(tmp_path, method="hyperopt"))
    with pytest.raises(ConfigError, match=r"key 'metric'.*goal"):
        sweep.load_sweep(_write_sweep(tmp_path, metric={"name": "val/auroc"}))
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch' in sweep .*\(overrides\)"):
        sweep.load_sweep(_write_sweep(tmp_path, overrides=["trainer.max_epoch=3"]))
    with pytest.raises(ConfigError, match=r"optim\.lr'\] are swept"):
        sweep.load_sweep(_write_sweep(tmp_path), overrides=["optim.lr=0.1"])
    with pytest.raises(ConfigError, match="unknown sweep 'nope'.*abmil_lr"):
        sweep.load_sweep("nope")
    with pytest.raises(ConfigError, match="needs a number of trials"):
        sweep.run_sweep(_write_sweep(tmp_path, method="random"), mode="offline")


HYPERBAND = {"type": "hyperband", "min_iter": 1, "eta": 2}
AUROC = {"name": "val/auroc", "goal": "maximize"}


def _validate(monitor: TrialMonitor, trainer: SimpleNamespace, auroc: float) -> None:
    trainer.callback_metrics = {"val/auroc": torch.tensor(auroc), "val/loss": torch.tensor(0.5)}
    monitor.on_validation_end(trainer, None)
    trainer.current_epoch += 1


def _trial(study: optuna.Study, name: str, aurocs: list[float]) -> tuple[TrialMonitor, SimpleNamespace]:
    """A trial whose validation epochs log ``aurocs`` (stopping where the monitor says), told to the study."""
    trial = study.ask()
    monitor = TrialMonitor(name, AUROC, trial)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, should_stop=False)
    for a in aurocs:
        _validate(monitor, trainer, a)
        if trainer.should_stop:
            break
    if trainer.should_stop:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, max(h["val/auroc"] for h in monitor.history))
    return monitor, trainer


def test_hyperband_prunes_a_clearly_bad_trial_at_the_first_band():
    study = optuna.create_study(direction="maximize", pruner=sweep_space.make_pruner(HYPERBAND, "test"))
    for i, hist in enumerate([[0.6, 0.80, 0.82, 0.85], [0.6, 0.85, 0.9, 0.9], [0.6, 0.90, 0.92, 0.95]]):
        _, trainer = _trial(study, f"t{i}", hist)
        assert not trainer.should_stop, i  # each was the best so far at every band
    bad, trainer = _trial(study, "bad", [0.50, 0.55, 0.9, 0.9])
    assert trainer.should_stop and bad.stopped_epoch == 1  # no band before history index 1
    assert [h["val/auroc"] for h in bad.history] == pytest.approx([0.50, 0.55])
    # the trial reported its best value so far at each validation index
    assert study.trials[-1].intermediate_values == pytest.approx({0: 0.50, 1: 0.55})
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED

    good, trainer = _trial(study, "good", [0.6, 0.92, 0.95, 0.97])
    assert not trainer.should_stop and good.stopped_epoch is None

    record_only = TrialMonitor("bad2", AUROC, None)  # e.g. online: the server decides
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, should_stop=False)
    for a in (0.5, 0.55):
        _validate(record_only, trainer, a)
    assert not trainer.should_stop and len(record_only.history) == 2


def test_hyperband_prunes_trials_that_do_not_learn(bag_data: Path, tmp_path: Path):
    """A real grid: lr=1e-2 learns; 1e-9 and 1e-10 do not. The learner is placed where the
    seeded grid starts (the first trial is always kept); each non-learner is then outside the
    top 1/eta = 1/2 at the first band and stops after 2 of 3 epochs."""
    index = sweep_space.search_space({"optim.lr": {"values": [0, 1, 2]}}, "test")
    first = optuna.create_study(sampler=sweep_space.make_sampler("grid", index, 0, 0)).ask(
        index.distributions).params["optim.lr"]  # the grid's first point, for seed 0
    values = [1e-9, 1e-10]
    values.insert(first, 1e-2)
    path = _write_sweep(tmp_path, parameters={"optim.lr": {"values": values}}, early_terminate=HYPERBAND)
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 3, "seed": 0})
    records = sorted(sweep.run_sweep(path, mode="offline", overrides=over), key=lambda r: r.name)
    assert [r.params["optim.lr"] for r in records][0] == 1e-2
    assert [(r.state, len(r.history)) for r in records] == [("finished", 3)] + [("early_terminated", 2)] * 2
    assert records[0].metric < min(r.metric for r in records[1:])  # pruned: their best of 2 epochs
    rows = {row["trial"]: row["state"] for row in csv.DictReader((records[0].run_dir.parent / "trials.csv").open())}
    assert rows == {r.name: r.state for r in records}


def test_sanity_check_is_not_recorded_and_trial_value():
    m = TrialMonitor("t", AUROC, None)
    m.on_validation_end(SimpleNamespace(sanity_checking=True), None)
    assert m.history == []
    hist = [{"val/loss": 0.7}, {"val/loss": 0.4}, {"val/loss": float("nan")}]
    assert sweep.trial_value("val/loss", "minimize", hist, {}) == 0.4
    assert sweep.trial_value("val/loss", "maximize", hist, {}) == 0.7
    assert sweep.trial_value("test/auroc", "maximize", hist, {"test/auroc": 0.8}) == 0.8
    assert sweep.trial_value("val/auroc", "maximize", hist, {}) is None


def test_online_agent_plumbing_with_a_fake_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No server here: a stand-in ``wandb`` checks what the online agent sends and reads."""
    calls: dict[str, object] = {}

    def fake_sweep(sweep, project=None, entity=None):
        calls["sweep"], calls["project"] = sweep, project
        return "sweep123"

    def fake_agent(sweep_id, function, count=None, project=None, entity=None):
        calls["agent"] = (sweep_id, count)
        for lr in LR_VALUES[:count]:
            fake.next_config = {"optim.lr": lr}
            function()

    fake = SimpleNamespace(run=None, sweep=fake_sweep, agent=fake_agent, next_config={},
                           init=lambda **kw: SimpleNamespace(config=fake.next_config))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    seen = []

    def fake_trial(sweep_cfg, params, name, sweep_dir, overrides, previous):
        seen.append(overrides)
        return sweep.TrialRecord(name, params, params["optim.lr"], sweep_dir / name, "finished")

    monkeypatch.setattr(sweep, "_guarded_trial", fake_trial)
    records = sweep.run_sweep(_write_sweep(tmp_path, count=2), mode="online", runs_dir=tmp_path / "runs")
    assert calls["agent"] == ("sweep123", 2) and calls["project"] == "wsi_lightning"
    assert set(calls["sweep"]) == {"method", "metric", "parameters"}  # our keys stripped
    assert [r.params["optim.lr"] for r in records] == LR_VALUES[:2]  # ranked: val/loss minimised
    assert all("logger.wandb.mode=online" in o for o in seen)
    assert yaml.safe_load(next((tmp_path / "runs" / "sweeps").rglob("sweep.yaml")).read_text())["sweep_id"] == "sweep123"


def test_interrupted_offline_sweep_resumes_to_the_same_trials(bag_data: Path, tmp_path: Path, monkeypatch):
    """Kill a sweep in the middle of trial 1's fit; --resume keeps trial 0 (finished in the
    study), runs trial 1 again with its parameters, continuing its fit from the last epoch, and
    runs trial 2 (proposed from the seed and its slot): the values of an uninterrupted sweep."""
    import lightning as L

    from wsi_lightning import run

    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{"trainer.max_epochs": 3})
    path = _write_sweep(tmp_path, method="random", count=3,
                        parameters={"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}})
    whole = {r.name: r for r in sweep.run_sweep(path, mode="offline", overrides=over)}

    class Interrupt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.default_root_dir.endswith("trial_001") and trainer.current_epoch == 2:
                raise KeyboardInterrupt  # not a trial failure: the whole sweep stops

    real_fit = run.fit
    monkeypatch.setattr(run, "fit", lambda cfg, run_dir=None, extra_callbacks=None, resume=False: real_fit(
        cfg, run_dir, [*(extra_callbacks or []), Interrupt()], resume))
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl-C into SystemExit(1)
        sweep.run_sweep(path, mode="offline", overrides=[*over, "paths.runs=" + str(tmp_path / "cut")])
    sweep_dir = next((tmp_path / "cut" / "sweeps" / path.stem).iterdir())
    first = (sweep_dir / "trial_000" / "metrics.json").stat().st_mtime_ns
    assert not (sweep_dir / "trial_001" / "metrics.json").exists()
    assert (sweep_dir / "trial_001" / "checkpoints" / "last.ckpt").exists()
    calls: list[tuple[str, bool]] = []

    def spy(cfg, run_dir=None, extra_callbacks=None, resume=False):
        calls.append((Path(run_dir).name, resume))
        return real_fit(cfg, run_dir, extra_callbacks, resume)

    monkeypatch.setattr(run, "fit", spy)
    resumed = {r.name: r for r in sweep.run_sweep(path, mode="offline", resume=sweep_dir,
                                                  overrides=["trainer.num_threads=1"])}
    assert calls == [("trial_001", True), ("trial_002", False)]
    assert (sweep_dir / "trial_000" / "metrics.json").stat().st_mtime_ns == first  # read back, not rerun
    assert resumed.keys() == whole.keys() == {"trial_000", "trial_001", "trial_002"}
    for name, r in whole.items():
        assert resumed[name].params == r.params
        assert resumed[name].metric == pytest.approx(r.metric, rel=1e-6), name
        assert resumed[name].metrics == pytest.approx(r.metrics, rel=1e-6), name
    study = optuna.load_study(study_name=path.stem, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal"))))
    attempts = [(t.user_attrs["name"], t.state.name, "interrupted" in t.user_attrs) for t in study.trials]
    assert attempts == [("trial_000", "COMPLETE", False), ("trial_001", "FAIL", True),
                        ("trial_001", "COMPLETE", False), ("trial_002", "COMPLETE", False)]
    assert [r["trial"] for r in csv.DictReader((sweep_dir / "trials.csv").open())] == [
        r.name for r in sorted(resumed.values(), key=lambda r: r.metric)]
    with pytest.raises(Exception, match="would change the trials"):
        sweep.run_sweep(path, mode="offline", resume=sweep_dir, overrides=["optim.lr=0.1"])
