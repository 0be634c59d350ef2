"""The W&B -> Optuna translation of sweep files (wsi_lightning/sweep_space.py): distributions,
refusals, the built-in files' spaces against their W&B specs, grids that exhaust."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from wsi_lightning import sweep, sweep_space
from wsi_lightning.errors import ConfigError

CASES = [
    ({"value": 3}, CategoricalDistribution([3])),
    ({"distribution": "constant", "value": "adam"}, CategoricalDistribution(["adam"])),
    ({"values": [True, False]}, CategoricalDistribution([True, False])),
    ({"distribution": "categorical", "values": [1, "a", None]}, CategoricalDistribution([1, "a", None])),
    ({"min": 1, "max": 4}, IntDistribution(1, 4)),
    ({"distribution": "int_uniform", "min": 2, "max": 9}, IntDistribution(2, 9)),
    ({"min": 0.0, "max": 0.5}, FloatDistribution(0.0, 0.5)),
    ({"distribution": "uniform", "min": 0, "max": 2}, FloatDistribution(0.0, 2.0)),
    ({"distribution": "q_uniform", "min": 0, "max": 10, "q": 2}, IntDistribution(0, 10, step=2)),
    ({"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}, FloatDistribution(0.0, 1.0, step=0.25)),
    ({"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}, FloatDistribution(1e-5, 1e-2, log=True)),
    ({"distribution": "inv_log_uniform_values", "min": 0.1, "max": 10}, FloatDistribution(0.1, 10.0, log=True)),
    ({"distribution": "log_uniform", "min": -3, "max": 0}, FloatDistribution(math.exp(-3), 1.0, log=True)),
    ({"distribution": "inv_log_uniform", "min": 0, "max": 2}, FloatDistribution(math.exp(-2), 1.0, log=True)),
    ({"distribution": "q_log_uniform_values", "min": 8, "max": 512, "q": 1}, IntDistribution(8, 512, log=True)),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_wandb_spec_becomes_its_optuna_distribution(spec: dict, expected):
    space = sweep_space.search_space({"k": spec}, "test")
    assert space.distributions["k"] == expected
    assert not space.encoded


def test_list_values_are_json_choices_decoded_for_the_trial():
    space = sweep_space.search_space({"method.dims": {"values": [[64, 32], [128]]}}, "test")
    assert space.distributions["method.dims"] == CategoricalDistribution(["[64, 32]", "[128]"])
    assert space.decode({"method.dims": "[128]"}) == {"method.dims": [128]}
    assert space.example() == {"method.dims": [64, 32]}


@pytest.mark.parametrize(("spec", "message"), [
    ({"distribution": "normal", "mu": 0, "sigma": 1}, r"normal has no Optuna distribution"),
    ({"values": [1, 2], "probabilities": [0.5, 0.5]}, r"categorical_w_probabilities has no Optuna"),
    ({"distribution": "q_log_uniform_values", "min": 8, "max": 512, "q": 8}, r"q: 1 and integer bounds"),
    ({"distribution": "log_uniform_values", "min": 0, "max": 1}, r"needs min > 0"),
    ({"distribution": "uniform", "min": 1.0, "max": 1.0}, r"min 1.0 is not less than max"),
    ({"distribution": "uniform", "min": 0, "max": 1, "q": 2}, r"uniform takes \['min', 'max'\]; unexpected \['q'\]"),
    ({"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.3}, r"multiple of q"),
    ({"distribution": "int_uniform", "min": 0.5, "max": 3}, r"integer min and max"),
    ({"distribution": "gaussian", "min": 0, "max": 1}, r"unknown distribution 'gaussian'"),
    ({"max": 1}, r"not a W&B parameter spec"),
])
def test_specs_without_an_optuna_counterpart_are_refused_naming_the_key(spec: dict, message: str):
    with pytest.raises(ConfigError, match=r"sweep x\.yaml: parameters\.optim\.lr: .*" + message):
        sweep_space.search_space({"optim.lr": spec}, "sweep x.yaml")


def test_hyperband_becomes_successive_halving_and_other_forms_are_refused():
    pruner = sweep_space.make_pruner({"type": "hyperband", "min_iter": 3, "eta": 2}, "s")
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert (pruner._min_resource, pruner._reduction_factor, pruner._min_early_stopping_rate) == (3, 2, 0)
    assert sweep_space.make_pruner({"type": "hyperband", "min_iter": 1}, "s")._reduction_factor == 3  # W&B's default
    assert isinstance(sweep_space.make_pruner(None, "s"), optuna.pruners.NopPruner)
    for et, msg in [({"type": "hyperband", "max_iter": 27, "s": 2}, "max_iter/s"),
                    ({"type": "hyperband", "min_iter": 3, "eta": 1.5}, "eta: an integer >= 2"),
                    ({"type": "hyperband", "min_iter": 0}, "min_iter: an integer >= 1"),
                    ({"type": "median"}, "expected {type: hyperband")]:
        with pytest.raises(ConfigError, match=msg):
            sweep_space.make_pruner(et, "s")


def _wandb_law(spec: dict) -> tuple:
    """What W&B's docs say a spec draws, written out here independently of sweep_space:
    ('choice', values) or (kind, low, high, log) with kind int | float."""
    d = spec.get("distribution")
    if "values" in spec or "value" in spec:
        return ("choice", tuple(spec.get("values", [spec.get("value")])))
    if d is None:
        d = "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
    log = "log" in d
    lo, hi = spec["min"], spec["max"]
    if d in ("log_uniform", "inv_log_uniform"):
        lo, hi = (math.exp(lo), math.exp(hi)) if d == "log_uniform" else (math.exp(-hi), math.exp(-lo))
    return ("int" if d == "int_uniform" else "float", lo, hi, log)


def _optuna_law(dist) -> tuple:
    if isinstance(dist, CategoricalDistribution):
        return ("choice", tuple(dist.choices))
    return ("int" if isinstance(dist, IntDistribution) else "float", dist.low, dist.high, dist.log)


@pytest.mark.parametrize("name", sweep.list_sweeps())
def test_offline_and_online_search_the_same_space(name: str):
    """Each built-in sweep file: the parameters W&B gets (online) are the file's, and the Optuna
    distributions (offline) have the same choices, bounds and scale."""
    doc = yaml.safe_load(sweep.sweep_path(name).read_text())
    sent = sweep.wandb_part(sweep.load_sweep(name))
    assert sent["parameters"] == doc["parameters"] and sent["method"] == doc["method"]
    space = sweep_space.search_space(doc["parameters"], name)
    assert space.distributions.keys() == doc["parameters"].keys()
    for key, spec in doc["parameters"].items():
        assert _optuna_law(space.distributions[key]) == _wandb_law(spec), key
    sampler = sweep_space.make_sampler(doc["method"], space, 0, 0)
    expected = {"grid": "GridSampler", "random": "RandomSampler", "bayes": "TPESampler"}[doc["method"]]
    assert expected in [c.__name__ for c in type(sampler).__mro__]


def test_grid_enumerates_int_and_q_uniform_and_refuses_continuous():
    space = sweep_space.search_space({
        "a": {"values": ["x", "y"]}, "b": {"min": 1, "max": 3},
        "c": {"distribution": "q_uniform", "min": 0.0, "max": 0.3, "q": 0.1}}, "s")
    assert space.grid("s") == {"a": ["x", "y"], "b": [1, 2, 3], "c": [0.0, 0.1, 0.2, 0.3]}
    assert space.grid_size("s") == 24
    cont = sweep_space.search_space({"optim.lr": {"min": 0.0, "max": 1.0}}, "s")
    with pytest.raises(ConfigError, match=r"method grid needs values.*parameters\.optim\.lr is continuous"):
        cont.grid("s")


def _fake_trial(sweep_cfg, params, name, sweep_dir, overrides, trial, resume=False):
    """A trial without training: its value is a function of its parameters."""
    value = float(sum(hash(str(v)) % 97 for v in params.values()))
    return sweep.TrialRecord(name, dict(params), value, sweep_dir / name, "finished",
                             started=sweep._now(), ended=sweep._now(), worker=sweep.WORKER)


def test_grid_sweep_takes_every_point_once_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sweep, "_guarded_trial", _fake_trial)
    path = tmp_path / "grid.yaml"
    params = {"optim.lr": {"values": [1e-4, 1e-3]}, "method.gated": {"values": [True, False]},
              "method.dropout": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.25}}
    path.write_text(yaml.safe_dump({"experiment": "abmil", "method": "grid", "parameters": params,
                                    "metric": {"name": "val/loss", "goal": "minimize"}}))
    records = sweep.run_sweep(path, mode="offline", runs_dir=tmp_path / "runs")
    points = {(r.params["optim.lr"], r.params["method.gated"], r.params["method.dropout"]) for r in records}
    assert len(records) == 12 and points == set(itertools.product([1e-4, 1e-3], [True, False], [0.0, 0.25, 0.5]))
    assert [r.metric for r in records] == sorted(r.metric for r in records)  # ranked, minimised
    fewer = sweep.run_sweep(path, mode="offline", runs_dir=tmp_path / "runs", count=5)
    assert len(fewer) == 5 and len({tuple(r.params.values()) for r in fewer}) == 5
