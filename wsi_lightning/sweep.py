"""Hyperparameter sweeps: W&B sweep files whose parameters are dotted config keys.

A sweep file (``experiments/sweeps/<name>.yaml``) is W&B's sweep format plus three keys of ours,
removed before the rest goes to W&B::

    experiment: abmil              # which experiment YAML every trial runs
    count: 8                       # default number of trials (grid: stops when exhausted)
    overrides: [trainer.max_epochs=20]   # applied to every trial
    method: random                 # grid | random | bayes
    metric: {name: val/auroc, goal: maximize}
    parameters:
      optim.lr: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-3}
      method.gated: {values: [true, false]}
    early_terminate: {type: hyperband, min_iter: 3, eta: 2}

Two agents run the same ``run_trial``: ``online`` asks a W&B server (``wandb.sweep`` +
``wandb.agent``); ``offline`` asks an Optuna study (the file translated by
``wsi_lightning/sweep_space.py``: grid / random / bayes -> GridSampler / RandomSampler /
TPESampler, hyperband -> SuccessiveHalvingPruner, checked after each validation epoch by
``TrialMonitor``). Each trial is a normal run in ``<paths.runs>/sweeps/<sweep>/<timestamp>/trial_<i>/``;
the sweep folder gets ``sweep.yaml`` (the resolved sweep), ``study.journal`` (the Optuna study,
a JournalStorage file) and ``trials.csv`` (trials ranked by the metric, rewritten after each trial).

Offline workers: ``workers`` processes (spawned) ask the study for trials until ``count`` are
taken; more processes, on this machine or another one that sees the sweep folder, join with
``join=<sweep folder>``. A short file lock (``ask.lock``) makes taking a trial's slot, its
proposal and its name one step, so the workers together run ``count`` trials, each once.

Every trial keeps the experiment's ``seed`` (same initialisation and split, so trials differ only by
their parameters); sweep ``seed`` itself as a parameter to measure seed noise. Proposals depend on
(the seed, the trial's slot, the trials finished before), never on training's random state.

Deviations from W&B:
    - ``metric.goal`` is required (W&B silently defaults to minimize).
    - A trial's value (offline ranking) is the best epoch of a per-epoch metric such as
      ``val/auroc`` (the epoch the checkpoint keeps when ``monitor.metric`` is the same metric), or
      the ``test/*`` value of the best checkpoint; W&B's run summary shows the last logged value.
    - A trial uses one device (``trainer.devices`` must be 1); run trials in parallel with
      offline workers or several online agents.
    - Offline proposals and early termination are Optuna's, not W&B's engine: see the
      deviations in ``wsi_lightning/sweep_space.py``. A parameter spec Optuna cannot express is
      refused for both agents, so the two search the same space.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from wsi_lightning import build, config, run, sweep_space
from wsi_lightning.errors import ConfigError, WSIError

log = logging.getLogger(__name__)

OUR_KEYS = ("experiment", "count", "overrides")
SEARCH_METHODS = sweep_space.METHODS
GOALS = ("minimize", "maximize")
MODES = ("auto", "offline", "online")
MAX_CONSECUTIVE_FAILURES = 3
STUDY_FILE = "study.journal"
ASK_LOCK = "ask"  # JournalFileOpenLock adds .lock


@dataclass
class TrialRecord:
    """One trial of a sweep.

    ``state`` is ``finished``, ``early_terminated`` (pruned at a hyperband band), ``failed``,
    or (summaries only) ``running``, ``waiting`` (queued to re-run) or ``interrupted``;
    ``metric`` is the trial's value of the sweep metric (None if never logged);
    ``metrics`` its test metrics; ``history`` the logged metrics after each validation epoch;
    ``started`` / ``ended`` ISO times and ``worker`` (``host:pid``) of the process that ran it.
    """

    name: str
    params: dict[str, Any]
    metric: float | None
    run_dir: Path | None
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    started: str | None = None
    ended: str | None = None
    worker: str | None = None


# ----------------------------------------------------------------------------- sweep files
def sweeps_dir() -> Path:
    return config.experiments_dir() / "sweeps"


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def sweep_path(name_or_path: str | Path) -> Path:
    """``experiments/sweeps/<name>.yaml``, or the YAML file given."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = sweeps_dir() / f"{name_or_path}.yaml"
    if not cand.exists():
        raise ConfigError(f"unknown sweep '{name_or_path}' (no {cand}); available: {list_sweeps()}")
    return cand


def wandb_part(sweep: dict) -> dict:
    """The sweep without our own keys: what W&B is given (and the offline engine translates)."""
    return {k: copy.deepcopy(v) for k, v in sweep.items() if k not in OUR_KEYS}


def load_sweep(name_or_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read and validate a sweep file.

    Checks the search method, metric, experiment, that every parameter is a config key of the
    experiment (method arguments included), that Optuna can express it (``sweep_space``) and
    that a value of each loads.

    Args:
        name_or_path: sweep name (``experiments/sweeps/<name>.yaml``) or a YAML path.
        overrides: extra ``key=value`` applied to every trial (checked too).

    Returns:
        The sweep as a plain dict (our keys included).
    """
    return _load(sweep_path(name_or_path), overrides)[0]


def _load(path: Path, overrides: list[str] | None) -> tuple[dict, DictConfig]:
    """The validated sweep and the experiment config of a trial (dry run)."""
    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read sweep {path}: {e}") from e
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep {path} must be a mapping (method, metric, parameters, experiment)")
    _check_structure(sweep, f"sweep {path}")
    return sweep, dry_run_config(sweep, overrides, f"sweep {path}")


def _check_structure(sweep: dict, where: str) -> None:
    if sweep.get("method") not in SEARCH_METHODS:
        raise ConfigError(f"{where}: key 'method' = {sweep.get('method')!r}; expected one of "
                          f"{list(SEARCH_METHODS)}")
    metric = sweep.get("metric")
    if not isinstance(metric, dict) or not metric.get("name") or metric.get("goal") not in GOALS:
        raise ConfigError(f"{where}: key 'metric' must be {{name: <logged metric, e.g. val/auroc>, "
                          f"goal: minimize | maximize}}; got {metric!r}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: key 'parameters' must map dotted config keys to W&B parameter "
                          "specs, e.g. {optim.lr: {values: [1.0e-4, 1.0e-3]}}")
    for k, spec in params.items():
        if not isinstance(spec, dict) or "parameters" in spec:
            raise ConfigError(f"{where}: parameters.{k} must be a W&B parameter spec (value, values "
                              "or distribution/min/max); write nested keys dotted, e.g. optim.lr")
    count = sweep.get("count")
    if count is not None and (type(count) is not int or count < 1):
        raise ConfigError(f"{where}: key 'count' = {count!r}; expected a positive integer")
    over = sweep.get("overrides", [])
    if not isinstance(over, list) or not all(isinstance(o, str) for o in over):
        raise ConfigError(f"{where}: key 'overrides' must be a list of 'key=value' strings")
    extra = sorted(set(sweep) - {*OUR_KEYS, "method", "metric", "parameters", "early_terminate",
                                 "name", "description", "program", "command", "project", "entity",
                                 "run_cap"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra}; expected W&B sweep keys (method, metric, "
                          f"parameters, early_terminate) and ours {list(OUR_KEYS)}")
    space = sweep_space.search_space(params, where)
    if sweep["method"] == "grid":
        space.grid(where)
    sweep_space.make_pruner(sweep.get("early_terminate"), where)


def dry_run_config(sweep: dict, overrides: list[str] | None, where: str) -> DictConfig:
    """The experiment config a trial would get with one value of every parameter."""
    exp = sweep.get("experiment")
    if not isinstance(exp, str) or not (exp in config.list_experiments() or Path(exp).exists()):
        raise ConfigError(f"{where}: key 'experiment' = {exp!r} is not an experiment; available: "
                          f"{config.list_experiments()}")
    base = OmegaConf.load(config.experiments_dir() / "_base.yaml")
    params = list(sweep["parameters"])
    config.check_keys(base, config.parse_overrides([f"{k}=0" for k in params]), f"{where} (parameters)")
    fixed = [*sweep.get("overrides", []), *(overrides or [])]
    config.check_keys(base, config.parse_overrides(fixed), f"{where} (overrides)")
    clash = sorted(set(params) & {o.split("=", 1)[0] for o in fixed})
    if clash:
        raise ConfigError(f"{where}: {clash} are swept parameters and also fixed by overrides; "
                          "drop one of the two")
    sample = sweep_space.search_space(sweep["parameters"], where).example()
    try:
        cfg = config.load(exp, [*fixed, *param_overrides(sample)])
        build.method_kwargs(cfg)  # method.* parameters: checked against the method's arguments
    except ConfigError as e:
        raise ConfigError(f"{where}: with parameters {sample}: {e}") from e
    if cfg.trainer.devices not in (1, "1") or int(cfg.trainer.num_nodes) != 1:
        raise ConfigError(f"{where}: a trial uses one device; set trainer.devices=1 (got "
                          f"{cfg.trainer.devices}) and trainer.num_nodes=1, and run trials in "
                          "parallel with --workers N")
    return cfg


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def param_overrides(params: dict[str, Any]) -> list[str]:
    """``{"optim.lr": 1e-4}`` -> ``["optim.lr=0.0001"]`` (JSON values are valid YAML)."""
    return [f"{k}={json.dumps(_plain(v))}" for k, v in params.items()]


# ----------------------------------------------------------------------------- trials
class TrialMonitor(L.Callback):
    """Records the logged metrics after every validation epoch; given an Optuna trial, reports
    the metric's best value so far to it (step = the validation epoch's index) and stops
    training when the study's pruner (hyperband: ``SuccessiveHalvingPruner``) says so.

    Args:
        name: the trial's name (unique within the sweep).
        metric: the sweep's ``{name, goal}``.
        trial: the Optuna trial; None = record only (e.g. the W&B server decides).
    """

    def __init__(self, name: str, metric: dict, trial: optuna.trial.Trial | None = None) -> None:
        if not isinstance(metric, dict) or not metric.get("name") or metric.get("goal") not in GOALS:
            raise ConfigError(f"TrialMonitor: metric must be {{name, goal: minimize | maximize}}; got {metric!r}")
        self.name = name
        self.metric = dict(metric)
        self.trial = trial
        self.history: list[dict[str, float]] = []
        self.stopped_epoch: int | None = None
        self._reported = 0  # history entries reported to the trial

    @property
    def state_key(self) -> str:
        return "TrialMonitor"

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint, so a resumed trial keeps its history (its value and the
        pruner's decisions read it)."""
        return {"history": [dict(h) for h in self.history], "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores into a fresh monitor only: testing the best checkpoint after the fit loads
        its (shorter) history too, which must not replace the epochs recorded since."""
        if self.history:
            return
        self.history = [dict(h) for h in state.get("history", [])]
        self.stopped_epoch = state.get("stopped_epoch")

    def _report(self) -> None:
        """Report the best value so far at every history entry not reported yet (a resumed
        trial reports its restored epochs first)."""
        key, best = self.metric["name"], None
        pick = max if self.metric["goal"] == "maximize" else min
        for step, entry in enumerate(self.history):
            v = entry.get(key)
            if v is not None and math.isfinite(v):
                best = v if best is None else pick(best, v)
            if step >= self._reported and best is not None:
                self.trial.report(best, step)
        self._reported = len(self.history)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
        entry["epoch"] = int(trainer.current_epoch)
        self.history.append(entry)
        if self.trial is None or self.stopped_epoch is not None:
            return
        self._report()
        if self.trial.should_prune():
            self.stopped_epoch = int(trainer.current_epoch)
            trainer.should_stop = True
            log.info("hyperband: stopping %s after epoch %d (%s below the band's threshold)",
                     self.name, self.stopped_epoch, self.metric["name"])


def _is_scalar(v: Any) -> bool:
    return getattr(v, "numel", lambda: 1)() == 1 and not isinstance(v, (str, bool))


def trial_value(metric: str, goal: str, history: list[dict[str, float]],
                test_metrics: dict[str, float]) -> float | None:
    """The trial's value: a test metric as measured, else the best epoch of the history."""
    if metric in test_metrics:
        return float(test_metrics[metric])
    vals = [h[metric] for h in history if metric in h and math.isfinite(h[metric])]
    if not vals:
        return None
    return max(vals) if goal == "maximize" else min(vals)


def run_trial(sweep_cfg: dict, params: dict[str, Any], trial_name: str, sweep_dir: Path,
              overrides: list[str] | None = None,
              trial: optuna.trial.Trial | None = None, resume: bool = False) -> TrialRecord:
    """Run one trial: the experiment with the sweep's overrides, ``overrides``, then ``params``.

    Args:
        sweep_cfg: the sweep (as ``load_sweep`` returns it).
        params: ``{dotted config key: value}``.
        trial_name: folder name of the run inside ``sweep_dir``.
        sweep_dir: the sweep's folder.
        overrides: extra ``key=value`` (command line).
        trial: the offline agent's Optuna trial (reports + pruning); None: record only.
        resume: continue the trial's interrupted fit from its ``last.ckpt``.
    """
    over = [*sweep_cfg.get("overrides", []), *(overrides or []), *param_overrides(params)]
    cfg = config.load(sweep_cfg["experiment"], over)
    w = cfg.logger.wandb  # one W&B group per sweep, unless the sweep names its own
    w.group, w.job_type = w.group or f"sweep/{sweep_dir.parent.name}/{sweep_dir.name}", w.job_type or "trial"
    monitor = TrialMonitor(trial_name, sweep_cfg["metric"], trial)
    started = _now()
    res = run.fit(cfg, run_dir=sweep_dir / trial_name, extra_callbacks=[monitor], resume=resume)
    m = sweep_cfg["metric"]
    value = trial_value(m["name"], m["goal"], monitor.history, res.metrics)
    if value is None:
        logged = sorted({k for h in monitor.history for k in h} | set(res.metrics))
        raise ConfigError(f"sweep metric.name '{m['name']}' was not logged by trial {trial_name}; "
                          f"logged metrics: {logged}")
    state = "finished" if monitor.stopped_epoch is None else "early_terminated"
    return TrialRecord(trial_name, dict(params), value, res.run_dir, state, dict(res.metrics),
                       monitor.history, started=started, ended=_now(), worker=WORKER)


def _guarded_trial(sweep_cfg: dict, params: dict[str, Any], name: str, sweep_dir: Path,
                   overrides: list[str], trial: optuna.trial.Trial | None,
                   resume: bool = False) -> TrialRecord:
    """``run_trial``; a crash (not a config error) is recorded as a failed trial. The record is
    written to ``<trial>/trial.json``."""
    started = _now()
    try:
        rec = run_trial(sweep_cfg, params, name, sweep_dir, overrides, trial, resume=resume)
    except WSIError:
        raise
    except Exception as e:
        log.exception("trial %s failed with parameters %s", name, params)
        rec = TrialRecord(name, dict(params), None, sweep_dir / name, "failed", error=repr(e),
                          started=started, ended=_now(), worker=WORKER)
    _write_record(sweep_dir / name / TRIAL_FILE, rec)
    return rec


TRIAL_FILE = "trial.json"
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # this process (a spawned worker has its own)


def _now() -> str:
    return datetime.now().isoformat(timespec="milliseconds")


def _record_json(rec: TrialRecord) -> dict[str, Any]:
    d = {**rec.__dict__, "run_dir": None if rec.run_dir is None else str(rec.run_dir)}
    return json.loads(json.dumps(d, default=_plain))


def _record_from(d: dict[str, Any]) -> TrialRecord:
    return TrialRecord(**{**d, "run_dir": None if d.get("run_dir") is None else Path(d["run_dir"])})


def _write_record(path: Path, rec: TrialRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_record_json(rec)))
    tmp.replace(path)


def _read_record(path: Path) -> TrialRecord:
    return _record_from(json.loads(path.read_text()))


def _finish_wandb_run() -> None:
    """Close a W&B run a trial's logger opened, so the next trial's logger starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


# ----------------------------------------------------------------------------- agents
def run_sweep(name_or_path: str | Path, count: int | None = None, mode: str = "auto",
              runs_dir: Path | None = None, overrides: list[str] | None = None,
              resume: str | Path | None = None, join: str | Path | None = None,
              workers: int = 1) -> list[TrialRecord]:
    """Run a sweep and rank its trials.

    Args:
        name_or_path: sweep name (``experiments/sweeps/<name>.yaml``) or a YAML path.
        count: number of trials (default: the file's ``count``; grid: until exhausted). With
            ``resume`` / ``join``: the sweep's new total.
        mode: ``online`` (W&B server agent), ``offline`` (Optuna study) or ``auto``: online when
            the experiment's ``logger.wandb`` is enabled with ``mode: online``.
        runs_dir: replaces ``paths.runs``.
        overrides: ``key=value`` applied to every trial (``resume`` / ``join``: execution
            settings only).
        resume: the folder of an interrupted offline sweep, none of whose workers still runs:
            finished trials are kept, trials that were running when it stopped run again with
            the same parameters and name (from their ``last.ckpt`` when an epoch had finished),
            then new trials until the total.
        join: the folder of an offline sweep (running or not): add workers; they take trials
            until the total, leaving other workers' running trials alone.
        workers: offline worker processes (1: this process).

    Returns:
        The trials, best first (failed ones last); offline: every trial of the study, whichever
        worker ran it.
    """
    if mode not in MODES:
        raise ConfigError(f"sweep mode {mode!r}; expected one of {list(MODES)}")
    if type(workers) is not int or workers < 1:
        raise ConfigError(f"--workers {workers!r}; expected an integer >= 1")
    if resume is not None and join is not None:
        raise ConfigError("--resume and --join exclude each other: --resume re-runs interrupted "
                          "trials of a stopped sweep, --join adds workers to a sweep")
    if resume is not None or join is not None:
        return _continue_sweep(name_or_path, Path(resume or join), overrides or [], count, workers,
                               requeue=resume is not None)
    overrides = [*(overrides or []), *([f"paths.runs={runs_dir}"] if runs_dir else [])]
    path = sweep_path(name_or_path)
    sweep_cfg, cfg = _load(path, overrides)
    w = cfg.logger.wandb
    online = mode == "online" or (mode == "auto" and w.enabled and w.mode == "online")
    count = count if count is not None else sweep_cfg.get("count")
    if not online and count is None and sweep_cfg["method"] != "grid":
        raise ConfigError(f"sweep {path}: a {sweep_cfg['method']} sweep needs a number of trials: "
                          "set 'count:' in the file or pass --count N")
    if online and workers != 1:
        raise ConfigError("--workers is for offline sweeps; run more online agents with "
                          "`wandb agent <sweep id>`")
    sweep_dir = _new_sweep_dir(Path(cfg.paths.runs) / "sweeps" / path.stem)
    trial_over = [*sweep_cfg.get("overrides", []), *overrides]
    if not online and w.enabled and w.mode == "online":
        log.info("offline sweep: trials log to W&B offline (logger.wandb.mode=offline)")
        trial_over.append("logger.wandb.mode=offline")
    resolved = {**sweep_cfg, "count": count, "overrides": trial_over,
                "mode": "online" if online else "offline", "seed": int(cfg.seed)}
    if not online:
        resolved["optuna"] = _study_summary(path.stem, sweep_cfg, int(cfg.seed), str(path))
    _write_yaml(sweep_dir / "sweep.yaml", resolved)
    log.info("sweep %s (%s, %s agent): trials in %s", path.stem, sweep_cfg["method"],
             resolved["mode"], sweep_dir)
    if online:
        records = _run_online(sweep_cfg, count, sweep_dir, overrides, cfg, resolved)
        return summarize(records, sweep_cfg["metric"], sweep_dir)
    open_study(sweep_dir, resolved)  # created before any worker starts
    return _run_offline(sweep_dir, resolved, [], count, workers)


def _continue_sweep(name_or_path: str | Path, sweep_dir: Path, overrides: list[str], count: int | None,
                    workers: int, requeue: bool) -> list[TrialRecord]:
    """``--resume`` (``requeue``) or ``--join`` the offline sweep in ``sweep_dir`` (see :func:`run_sweep`)."""
    flag = "--resume" if requeue else "--join"
    saved = sweep_dir / "sweep.yaml"
    if not saved.exists() or not (sweep_dir / STUDY_FILE).exists():
        raise WSIError(f"{flag} {sweep_dir}: not an offline sweep folder (no sweep.yaml and "
                       f"{STUDY_FILE}); pass runs/sweeps/<sweep>/<timestamp>")
    resolved = yaml.safe_load(saved.read_text())
    if resolved.get("mode") != "offline":
        raise WSIError(f"{flag} {sweep_dir}: an online (W&B server) sweep; continue it with "
                       f"`wandb agent {resolved.get('sweep_id', '<sweep id>')}`")
    path = sweep_path(name_or_path)
    sweep_cfg, _ = _load(path, [])
    now = json.loads(json.dumps(wandb_part(sweep_cfg), default=str))
    keys = ("method", "metric", "parameters", "early_terminate")
    if any(now.get(k) != resolved.get(k) for k in keys):
        raise WSIError(f"{flag} {sweep_dir}: {path} has changed since that sweep started "
                       "(method, metric or parameters differ); start a new sweep")
    refused = config.non_execution_keys(config.parse_overrides(overrides))
    if refused:
        raise WSIError(f"{flag} {sweep_dir}: override(s) {refused} would change the trials; only "
                       "execution settings (trainer.num_threads, data.num_workers, logger.*) may change")
    study = open_study(sweep_dir, resolved)
    if requeue:
        _requeue_interrupted(study, sweep_dir)
    log.info("%s sweep %s in %s", "resuming" if requeue else "joining", path.stem, sweep_dir)
    return _run_offline(sweep_dir, resolved, overrides, count if count is not None else resolved.get("count"),
                        workers)


def _new_sweep_dir(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d, i = base / stamp, 1
    while d.exists():
        d, i = base / f"{stamp}-{i}", i + 1
    d.mkdir(parents=True)
    return d


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))


# ----------------------------------------------------------------------------- offline: the study
def _study_summary(name: str, sweep_cfg: dict, seed: int, where: str) -> dict[str, Any]:
    """What ``sweep.yaml`` records of the study: storage, sampler, pruner, distributions."""
    space = sweep_space.search_space(sweep_cfg["parameters"], where)
    sampler = sweep_space.make_sampler(sweep_cfg["method"], space, seed, 0, where)
    et = sweep_cfg.get("early_terminate")
    sweep_space.make_pruner(et, where)
    pruner = "NopPruner" if et is None else (f"SuccessiveHalvingPruner(min_resource={et['min_iter']}, "
                                             f"reduction_factor={et.get('eta', 3)})")
    return {"storage": STUDY_FILE, "study_name": name, "sampler": type(sampler).__name__.lstrip("_"),
            "pruner": pruner, "search_space": {k: repr(d) for k, d in space.distributions.items()}}


def open_study(sweep_dir: Path, resolved: dict) -> optuna.Study:
    """The sweep's Optuna study in ``<sweep_dir>/study.journal`` (created when missing)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged by the agent
    where = f"sweep {sweep_dir / 'sweep.yaml'}"
    space = sweep_space.search_space(resolved["parameters"], where)
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / STUDY_FILE)))
    return optuna.create_study(
        storage=storage, study_name=resolved.get("optuna", {}).get("study_name", sweep_dir.parent.name),
        direction=resolved["metric"]["goal"], load_if_exists=True,
        sampler=sweep_space.make_sampler(resolved["method"], space, int(resolved["seed"]), 0, where),
        pruner=sweep_space.make_pruner(resolved.get("early_terminate"), where))


def _requeue_interrupted(study: optuna.Study, sweep_dir: Path) -> None:
    """Queue a re-run (same parameters and name) of every trial that was stopped by an
    interrupt or left running by a process that died; refuse while one of this host's
    workers still runs a trial."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get("name")
        if name is None:
            continue
        latest[name] = t
        if t.state == TrialState.RUNNING:
            w_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if w_host == host and pid.isdigit() and _alive(int(pid)):
                raise WSIError(f"--resume {sweep_dir}: process {pid} still runs {name}; wait for it or "
                               "stop it, or add workers with --join")
            if w_host != host:
                log.warning("%s was left running by %s; --resume assumes that worker stopped", name,
                            t.user_attrs.get("worker"))
            study.tell(t.number, state=TrialState.FAIL)
            latest[name] = study.get_trials(deepcopy=False)[t.number]
    for name, t in latest.items():
        interrupted = t.state == TrialState.FAIL and "record" not in t.user_attrs and "error" not in t.user_attrs
        if interrupted:
            log.info("%s was interrupted: queued to run again with %s", name, t.params)
            study.enqueue_trial(t.params, user_attrs={"name": name})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _total(resolved: dict, space: sweep_space.SearchSpace, count: int | None) -> int | None:
    if resolved["method"] != "grid":
        return count
    size = space.grid_size("sweep")
    return size if count is None else min(count, size)


def _next_trial(study: optuna.Study, sweep_dir: Path, resolved: dict, space: sweep_space.SearchSpace,
                total: int | None) -> optuna.trial.Trial | None:
    """Take the next trial (a queued re-run first), its proposal and its name under the sweep's
    lock; None once ``total`` trials are taken."""
    lock = JournalFileOpenLock(str(sweep_dir / ASK_LOCK))
    lock.acquire()
    try:
        trials = study.get_trials(deepcopy=False)
        names = {t.user_attrs["name"] for t in trials if "name" in t.user_attrs}
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and total is not None and len(names) >= total:
            return None
        slot = len(names)
        study.sampler = sweep_space.make_sampler(resolved["method"], space, int(resolved["seed"]), slot)
        trial = study.ask(space.distributions)
        trial.set_user_attr("name", trial.user_attrs.get("name", f"trial_{slot:03d}"))
        trial.set_user_attr("worker", WORKER)
        return trial
    finally:
        lock.release()


def _run_one(study: optuna.Study, trial: optuna.trial.Trial, resolved: dict,
             space: sweep_space.SearchSpace, sweep_dir: Path, overrides: list[str]) -> TrialRecord:
    """Run a trial the study gave and tell the study its outcome."""
    name, params = trial.user_attrs["name"], space.decode(trial.params)
    trial_dir = sweep_dir / name
    done = trial_dir / TRIAL_FILE
    rec = _read_record(done) if done.exists() else None
    if rec is not None and rec.params == params:  # finished before the study heard of it
        log.info("%s: done before (%s)", name, rec.state)
    else:
        resume = (trial_dir / "checkpoints" / "last.ckpt").exists() and not (trial_dir / "metrics.json").exists()
        if trial_dir.exists() and not resume:
            shutil.rmtree(trial_dir)  # started but no epoch finished: start it again
        log.info("%s (%s): %s%s", name, WORKER, params, " (resuming its interrupted fit)" if resume else "")
        try:
            rec = _guarded_trial(resolved, params, name, sweep_dir, overrides, trial, resume=resume)
        except BaseException as e:  # config error or interrupt: the study records why it stopped
            _tell_stopped(study, trial, e)
            raise
        finally:
            _finish_wandb_run()
    trial.set_user_attr("record", _record_json(rec))
    state = {"finished": TrialState.COMPLETE, "early_terminated": TrialState.PRUNED}.get(rec.state, TrialState.FAIL)
    study.tell(trial, rec.metric if state == TrialState.COMPLETE else None, state=state)
    return rec


def _tell_stopped(study: optuna.Study, trial: optuna.trial.Trial, e: BaseException) -> None:
    """FAIL, with ``error`` (a config error: not re-run) or ``interrupted`` (``--resume`` re-runs it)."""
    try:
        trial.set_user_attr("error" if isinstance(e, Exception) else "interrupted", repr(e)[:500])
        study.tell(trial, state=TrialState.FAIL)
    except Exception as tell_err:  # the original error matters more
        log.warning("could not record %s in the study: %s", trial.user_attrs.get("name"), tell_err)


def work(sweep_dir: Path, overrides: list[str] | None = None, count: int | None = None) -> None:
    """One offline worker: take a trial from the sweep's study, run it, record it, rewrite
    ``trials.csv``; until the sweep's total is taken.

    Args:
        sweep_dir: the sweep folder (``sweep.yaml`` + ``study.journal``).
        overrides: execution settings for this worker's trials (threads, device).
        count: the sweep's total number of trials (default: ``sweep.yaml``'s ``count``).
    """
    resolved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    space = sweep_space.search_space(resolved["parameters"], f"sweep {sweep_dir / 'sweep.yaml'}")
    study = open_study(sweep_dir, resolved)
    total = _total(resolved, space, count if count is not None else resolved.get("count"))
    failures = 0
    while (trial := _next_trial(study, sweep_dir, resolved, space, total)) is not None:
        rec = _run_one(study, trial, resolved, space, sweep_dir, list(overrides or []))
        write_trials_csv(rank(study_records(study, sweep_dir, space), resolved["metric"]["goal"]),
                         resolved["metric"], sweep_dir)
        failures = failures + 1 if rec.state == "failed" else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise WSIError(f"{failures} trials in a row failed (last: {rec.error}); see the log "
                           f"above and {sweep_dir}")
    log.info("%s: all %s trials of the sweep are taken", WORKER, total if total is not None else "grid")


def _run_offline(sweep_dir: Path, resolved: dict, overrides: list[str], count: int | None,
                 workers: int) -> list[TrialRecord]:
    """``workers`` workers on the sweep's study (this process when 1), then the ranked trials."""
    if workers == 1:
        work(sweep_dir, overrides, count)
    else:
        _spawn_workers(sweep_dir, resolved, overrides, count, workers)
    study = open_study(sweep_dir, resolved)
    space = sweep_space.search_space(resolved["parameters"], "sweep")
    return summarize(study_records(study, sweep_dir, space), resolved["metric"], sweep_dir)


def _spawn_workers(sweep_dir: Path, resolved: dict, overrides: list[str], count: int | None,
                   workers: int) -> None:
    """``workers`` spawned processes, each with ``trainer.num_threads`` = the CPU cores /
    ``workers`` (unless set), no progress bar and, on a machine with GPUs, a GPU of its own
    (worker i: GPU i mod the GPUs). The data trials read is prepared once, before they start."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    space = sweep_space.search_space(resolved["parameters"], "sweep")
    cfg = config.load(resolved["experiment"], [*resolved["overrides"], *overrides,
                                               *param_overrides(space.example())])
    threads = int(cfg.trainer.num_threads or max(1, (os.cpu_count() or 1) // workers))
    shared = [*overrides, f"trainer.num_threads={threads}", "trainer.enable_progress_bar=false",
              f"data.num_workers={min(int(cfg.data.num_workers), threads)}"]
    gpus = torch.cuda.device_count() if str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") else 0
    build.prepare_shared_data([cfg])
    log.info("sweep %s: %d workers (%d threads each%s)", sweep_dir, workers, threads,
             f", GPUs {list(range(min(workers, gpus)))}" if gpus else "")
    level = logging.getLogger("wsi_lightning").getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker_main, str(sweep_dir), [*shared, *([f"trainer.devices=[{i % gpus}]"]
                               if gpus else [])], count, level, i) for i in range(workers)]
        for f in futures:
            f.result()


def _worker_main(sweep_dir: str, overrides: list[str], count: int | None, level: int, index: int) -> None:
    """A spawned worker's entry point: its own log lines, then :func:`work`."""
    logging.basicConfig(level=level, format=f"%(asctime)s [worker {index}] %(message)s", datefmt="%X")
    work(Path(sweep_dir), overrides, count)


def study_records(study: optuna.Study, sweep_dir: Path,
                  space: sweep_space.SearchSpace | None = None) -> list[TrialRecord]:
    """The sweep's trials as recorded in the study: one per name (its latest attempt), in
    name order; a trial still running (or queued, or interrupted) has no value."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if "name" in t.user_attrs:
            latest[t.user_attrs["name"]] = t
    out = []
    for name in sorted(latest):
        t = latest[name]
        if "record" in t.user_attrs:
            out.append(_record_from(t.user_attrs["record"]))
            continue
        state = {TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(
            t.state, "failed" if "error" in t.user_attrs else "interrupted")
        started = t.datetime_start.isoformat(timespec="milliseconds") if t.datetime_start else None
        params = space.decode(t.params) if space is not None else dict(t.params)
        out.append(TrialRecord(name, params, None, sweep_dir / name, state,
                               error=t.user_attrs.get("error") or t.user_attrs.get("interrupted"),
                               started=started, worker=t.user_attrs.get("worker")))
    return out


def _run_online(sweep_cfg: dict, count: int | None, sweep_dir: Path, overrides: list[str],
                cfg: DictConfig, resolved: dict) -> list[TrialRecord]:
    """W&B agent: the server proposes (and early-terminates); each trial's WandbLogger reuses
    the agent's run (Lightning's WandbLogger attaches to ``wandb.run`` when one exists)."""
    import wandb

    w = cfg.logger.wandb
    wb = wandb_part(sweep_cfg)
    try:
        sweep_id = wandb.sweep(sweep=wb, project=w.project, entity=w.entity)
    except Exception as e:  # no login / no network: wandb raises its own errors
        raise WSIError(f"cannot create the W&B sweep ({e}); check `wandb login` and the network, "
                       "or run the local agent with --offline") from e
    _write_yaml(sweep_dir / "sweep.yaml", {**resolved, "sweep_id": sweep_id})
    trial_over = [*overrides, "logger.wandb.enabled=true", "logger.wandb.mode=online"]
    records: list[TrialRecord] = []

    def trial() -> None:
        agent_run = wandb.init(dir=str(sweep_dir))  # the agent's run: sweep id + params from env
        params = {k: _plain(_lookup(dict(agent_run.config), k)) for k in wb["parameters"]}
        name = f"trial_{len(records):03d}"
        records.append(_guarded_trial(sweep_cfg, params, name, sweep_dir, trial_over, None))

    wandb.agent(sweep_id, function=trial, count=count, project=w.project, entity=w.entity)
    return records


def _lookup(d: dict, dotted: str) -> Any:
    """``d["optim.lr"]``, or ``d["optim"]["lr"]`` if W&B nested the key."""
    if dotted in d:
        return d[dotted]
    for part in dotted.split("."):
        d = d[part]
    return d


# ----------------------------------------------------------------------------- summary
def rank(records: list[TrialRecord], goal: str) -> list[TrialRecord]:
    """Best first; trials without a value last (in trial order)."""
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(records, key=lambda r: (r.metric is None, sign * (r.metric or 0.0)))


def write_trials_csv(ranked: list[TrialRecord], metric: dict, sweep_dir: Path) -> Path:
    """``trials.csv``: the ranked trials with their parameters, test metrics, start and end
    times and worker (written to a temporary file, then renamed: readers never see half)."""
    params = sorted({k for r in ranked for k in r.params})
    tests = sorted({k for r in ranked for k in r.metrics} - {metric["name"]})
    path, tmp = sweep_dir / "trials.csv", sweep_dir / f".trials.csv.{os.getpid()}.tmp"
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "trial", "state", metric["name"], *params, *tests, "started", "ended",
                      "worker", "run_dir"])
        for i, r in enumerate(ranked, 1):
            out.writerow([i, r.name, r.state, r.metric, *(r.params.get(k) for k in params),
                          *(r.metrics.get(k) for k in tests), r.started, r.ended, r.worker, r.run_dir])
    tmp.replace(path)
    return path


def summarize(records: list[TrialRecord], metric: dict, sweep_dir: Path) -> list[TrialRecord]:
    """Rank the trials, write ``trials.csv`` into the sweep folder and print a table."""
    ranked = rank(records, metric["goal"])
    write_trials_csv(ranked, metric, sweep_dir)
    _print_table(ranked, metric, sorted({k for r in records for k in r.params}), sweep_dir)
    return ranked


def _print_table(ranked: list[TrialRecord], metric: dict, params: list[str], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep trials by {metric['name']} ({metric['goal']}) - {sweep_dir}")
    for col in ("rank", "trial", "state", metric["name"], *params):
        table.add_column(col, justify="right" if col != "trial" else "left")
    for i, r in enumerate(ranked, 1):
        val = "-" if r.metric is None else f"{r.metric:.4f}"
        table.add_row(str(i), r.name, r.state, val, *(_fmt(r.params.get(k)) for k in params))
    Console().print(table)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
