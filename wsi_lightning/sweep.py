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
``wandb.agent``); ``offline`` proposes with W&B's own engine (the ``sweeps`` package) in this
process and does hyperband early termination with a Lightning callback. Each trial is a normal run
in ``<paths.runs>/sweeps/<sweep>/<timestamp>/trial_<i>/``; the sweep folder gets ``sweep.yaml``
(the resolved sweep) and ``trials.csv`` (trials ranked by the metric).

Every trial keeps the experiment's ``seed`` (same initialisation and split, so trials differ only by
their parameters); sweep ``seed`` itself as a parameter to measure seed noise. Offline proposals
use their own random state, seeded from ``seed`` and never touched by training.

Deviations from W&B:
    - ``metric.goal`` is required (W&B silently defaults to minimize).
    - A trial's value (offline ranking) is the best epoch of a per-epoch metric such as
      ``val/auroc`` (the epoch the checkpoint keeps when ``monitor.metric`` is the same metric), or
      the ``test/*`` value of the best checkpoint; W&B's run summary shows the last logged value.
    - Trials run one at a time in this process, so ``trainer.devices`` must be 1 (start several
      online agents to run trials in parallel).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

with warnings.catch_warnings():  # sweeps' pydantic models warn about renamed v1 settings
    warnings.simplefilter("ignore")
    import sweeps
    import sweeps.bayes_search  # noqa: F401  imported before seeding: proposals reproducible
    import sweeps.grid_search  # noqa: F401
    import sweeps.random_search  # noqa: F401
    from sweeps import RunState, SweepRun

from wsi_lightning import build, config, run
from wsi_lightning.errors import ConfigError, WSIError

log = logging.getLogger(__name__)

OUR_KEYS = ("experiment", "count", "overrides")
SEARCH_METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
MODES = ("auto", "offline", "online")
MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class TrialRecord:
    """One trial of a sweep.

    ``state`` is ``finished``, ``early_terminated`` (stopped by hyperband) or ``failed``;
    ``metric`` is the trial's value of the sweep metric (None if never logged);
    ``metrics`` its test metrics; ``history`` the logged metrics after each validation epoch.
    """

    name: str
    params: dict[str, Any]
    metric: float | None
    run_dir: Path | None
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None


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
    """The sweep without our own keys: what W&B (or the ``sweeps`` engine) is given."""
    return {k: copy.deepcopy(v) for k, v in sweep.items() if k not in OUR_KEYS}


def load_sweep(name_or_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read and validate a sweep file.

    Checks the search method, metric, experiment, that every parameter is a config key of the
    experiment (method arguments included) and that a sampled value of each loads.

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
    et = sweep.get("early_terminate")
    if et is not None and (not isinstance(et, dict) or et.get("type") != "hyperband"):
        raise ConfigError(f"{where}: key 'early_terminate' = {et!r}; expected {{type: hyperband, "
                          "min_iter: <epochs>, eta: <int>}}")
    try:
        sweeps.SweepConfig(wandb_part(sweep))
    except Exception as e:  # jsonschema.ValidationError: message names the offending value
        raise ConfigError(f"{where}: not a valid W&B sweep: {getattr(e, 'message', e)}") from e


def dry_run_config(sweep: dict, overrides: list[str] | None, where: str) -> DictConfig:
    """The experiment config a trial would get with one sampled value of every parameter."""
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
    sample = propose(wandb_part(sweep) | {"method": "random"}, [], ProposalRNG(0)) or {}
    try:
        cfg = config.load(exp, [*fixed, *param_overrides(sample)])
        build.method_kwargs(cfg)  # method.* parameters: checked against the method's arguments
    except ConfigError as e:
        raise ConfigError(f"{where}: with sampled parameters {sample}: {e}") from e
    if cfg.trainer.devices not in (1, "1") or int(cfg.trainer.num_nodes) != 1:
        raise ConfigError(f"{where}: trials run one at a time in this process; set "
                          f"trainer.devices=1 (got {cfg.trainer.devices}) and trainer.num_nodes=1")
    return cfg


# ----------------------------------------------------------------------------- proposals
class ProposalRNG:
    """Python + NumPy global random states reserved for proposals (the ``sweeps`` engine draws
    from the globals); training's ``seed_everything`` between proposals does not change them."""

    def __init__(self, seed: int) -> None:
        outer = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self._state = random.getstate(), np.random.get_state()
        random.setstate(outer[0])
        np.random.set_state(outer[1])

    def __enter__(self) -> ProposalRNG:
        self._outer = random.getstate(), np.random.get_state()
        random.setstate(self._state[0])
        np.random.set_state(self._state[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self._state = random.getstate(), np.random.get_state()
        random.setstate(self._outer[0])
        np.random.set_state(self._outer[1])


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def propose(wandb_cfg: dict, runs: list[SweepRun], rng: ProposalRNG) -> dict[str, Any] | None:
    """Next parameters ``{dotted key: value}`` from the ``sweeps`` engine; None when a grid is done."""
    with rng, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bayes: sklearn convergence warnings on tiny sweeps
        nxt = sweeps.next_run(wandb_cfg, runs)
    return None if nxt is None else {k: _plain(v["value"]) for k, v in nxt.config.items()}


def param_overrides(params: dict[str, Any]) -> list[str]:
    """``{"optim.lr": 1e-4}`` -> ``["optim.lr=0.0001"]`` (JSON values are valid YAML)."""
    return [f"{k}={json.dumps(_plain(v))}" for k, v in params.items()]


def to_sweep_run(rec: TrialRecord, metric: str) -> SweepRun:
    """A finished trial as the ``sweeps`` engine expects it (aliased keywords: see docs/environment.md)."""
    return SweepRun(
        name=rec.name,
        state=RunState.failed if rec.state == "failed" else RunState.finished,
        config={k: {"value": v} for k, v in rec.params.items()},
        summaryMetrics={} if rec.metric is None else {metric: rec.metric},
        sampledHistory=rec.history,
        stopped=rec.state == "early_terminated",
    )


# ----------------------------------------------------------------------------- trials
class TrialMonitor(L.Callback):
    """Records the logged metrics after every validation epoch; with a hyperband
    ``early_terminate`` asks ``sweeps.stop_runs`` whether this trial falls below the band's
    threshold (set by ``previous`` trials and this one) and if so stops training.

    Args:
        name: the trial's name (unique within the sweep).
        wandb_cfg: the W&B part of the sweep (metric, early_terminate).
        previous: the sweep's finished trials; None = record only (e.g. the server decides).
    """

    def __init__(self, name: str, wandb_cfg: dict, previous: list[SweepRun] | None = None) -> None:
        et = wandb_cfg.get("early_terminate")
        if et is not None and (et.get("type") != "hyperband" or "metric" not in wandb_cfg):
            raise ConfigError(f"early_terminate {et!r}: only type hyperband (with a metric) is supported")
        self.name = name
        self.wandb_cfg = wandb_cfg
        self.previous = previous
        self.history: list[dict[str, float]] = []
        self.stopped_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return "TrialMonitor"

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint, so a resumed trial keeps its history (its value and the
        hyperband decisions read it)."""
        return {"history": [dict(h) for h in self.history], "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.stopped_epoch = state.get("stopped_epoch")

    @property
    def early_terminates(self) -> bool:
        return self.previous is not None and "early_terminate" in self.wandb_cfg

    def should_stop(self) -> bool:
        current = SweepRun(name=self.name, state=RunState.running, sampledHistory=self.history)
        to_stop = sweeps.stop_runs(self.wandb_cfg, [*(self.previous or []), current])
        if current.early_terminate_info:
            log.debug("hyperband: %s", current.early_terminate_info["lines"])
        return any(r.name == self.name for r in to_stop)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
        entry["epoch"] = int(trainer.current_epoch)
        self.history.append(entry)
        if self.early_terminates and self.stopped_epoch is None and self.should_stop():
            self.stopped_epoch = int(trainer.current_epoch)
            trainer.should_stop = True
            log.info("hyperband: stopping %s after epoch %d (%s below the band's threshold)",
                     self.name, self.stopped_epoch, self.wandb_cfg["metric"]["name"])


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
              previous: list[SweepRun] | None = None, resume: bool = False) -> TrialRecord:
    """Run one trial: the experiment with the sweep's overrides, ``overrides``, then ``params``.

    Args:
        sweep_cfg: the sweep (as ``load_sweep`` returns it).
        params: ``{dotted config key: value}``.
        trial_name: folder name of the run inside ``sweep_dir``.
        sweep_dir: the sweep's folder.
        overrides: extra ``key=value`` (command line).
        previous: finished trials, for offline hyperband early termination (None: none).
        resume: continue the trial's interrupted fit from its ``last.ckpt``.
    """
    over = [*sweep_cfg.get("overrides", []), *(overrides or []), *param_overrides(params)]
    cfg = config.load(sweep_cfg["experiment"], over)
    w = cfg.logger.wandb  # one W&B group per sweep, unless the sweep names its own
    w.group, w.job_type = w.group or f"sweep/{sweep_dir.parent.name}/{sweep_dir.name}", w.job_type or "trial"
    monitor = TrialMonitor(trial_name, wandb_part(sweep_cfg), previous)
    res = run.fit(cfg, run_dir=sweep_dir / trial_name, extra_callbacks=[monitor], resume=resume)
    m = sweep_cfg["metric"]
    value = trial_value(m["name"], m["goal"], monitor.history, res.metrics)
    if value is None:
        logged = sorted({k for h in monitor.history for k in h} | set(res.metrics))
        raise ConfigError(f"sweep metric.name '{m['name']}' was not logged by trial {trial_name}; "
                          f"logged metrics: {logged}")
    state = "finished" if monitor.stopped_epoch is None else "early_terminated"
    return TrialRecord(trial_name, dict(params), value, res.run_dir, state, dict(res.metrics),
                       monitor.history)


def _guarded_trial(sweep_cfg: dict, params: dict[str, Any], name: str, sweep_dir: Path,
                   overrides: list[str], previous: list[SweepRun] | None, resume: bool = False) -> TrialRecord:
    """``run_trial``; a crash (not a config error) is recorded as a failed trial. The record is
    written to ``<trial>/trial.json`` (what a resumed sweep reads back instead of rerunning)."""
    try:
        rec = run_trial(sweep_cfg, params, name, sweep_dir, overrides, previous, resume=resume)
    except WSIError:
        raise
    except Exception as e:
        log.exception("trial %s failed with parameters %s", name, params)
        rec = TrialRecord(name, dict(params), None, sweep_dir / name, "failed", error=repr(e))
    _write_record(sweep_dir / name / TRIAL_FILE, rec)
    return rec


TRIAL_FILE = "trial.json"


def _write_record(path: Path, rec: TrialRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**rec.__dict__, "run_dir": None if rec.run_dir is None else str(rec.run_dir)},
                              default=_plain))
    tmp.replace(path)


def _read_record(path: Path) -> TrialRecord:
    d = json.loads(path.read_text())
    return TrialRecord(**{**d, "run_dir": None if d.get("run_dir") is None else Path(d["run_dir"])})


def _finish_wandb_run() -> None:
    """Close a W&B run a trial's logger opened, so the next trial's logger starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


# ----------------------------------------------------------------------------- agents
def run_sweep(name_or_path: str | Path, count: int | None = None, mode: str = "auto",
              runs_dir: Path | None = None, overrides: list[str] | None = None,
              resume: str | Path | None = None) -> list[TrialRecord]:
    """Run a sweep and rank its trials.

    Args:
        name_or_path: sweep name (``experiments/sweeps/<name>.yaml``) or a YAML path.
        count: number of trials (default: the file's ``count``; grid: until exhausted).
        mode: ``online`` (W&B server agent), ``offline`` (local agent) or ``auto``: online when
            the experiment's ``logger.wandb`` is enabled with ``mode: online``.
        runs_dir: replaces ``paths.runs``.
        overrides: ``key=value`` applied to every trial.
        resume: the folder of an interrupted offline sweep: it continues with that sweep's
            saved settings (``sweep.yaml``); finished trials are read back (``trial.json``),
            the interrupted one resumes from its ``last.ckpt``, and the proposals replay (they
            depend only on the seed and the finished trials' values).

    Returns:
        The trials, best first (failed ones last).
    """
    if mode not in MODES:
        raise ConfigError(f"sweep mode {mode!r}; expected one of {list(MODES)}")
    if resume is not None:
        return _resume_sweep(name_or_path, Path(resume), overrides or [])
    overrides = [*(overrides or []), *([f"paths.runs={runs_dir}"] if runs_dir else [])]
    path = sweep_path(name_or_path)
    sweep_cfg, cfg = _load(path, overrides)
    w = cfg.logger.wandb
    online = mode == "online" or (mode == "auto" and w.enabled and w.mode == "online")
    count = count if count is not None else sweep_cfg.get("count")
    if not online and count is None and sweep_cfg["method"] != "grid":
        raise ConfigError(f"sweep {path}: a {sweep_cfg['method']} sweep needs a number of trials: "
                          "set 'count:' in the file or pass --count N")
    sweep_dir = _new_sweep_dir(Path(cfg.paths.runs) / "sweeps" / path.stem)
    resolved = {**sweep_cfg, **sweeps.SweepConfig(wandb_part(sweep_cfg)), "count": count,
                "overrides": [*sweep_cfg.get("overrides", []), *overrides],
                "mode": "online" if online else "offline", "seed": int(cfg.seed)}
    _write_yaml(sweep_dir / "sweep.yaml", resolved)
    log.info("sweep %s (%s, %s agent): trials in %s", path.stem, sweep_cfg["method"],
             resolved["mode"], sweep_dir)
    if online:
        records = _run_online(sweep_cfg, count, sweep_dir, overrides, cfg, resolved)
    else:
        if w.enabled and w.mode == "online":
            log.info("offline sweep: trials log to W&B offline (logger.wandb.mode=offline)")
            overrides = [*overrides, "logger.wandb.mode=offline"]
        records = _run_offline(sweep_cfg, count, sweep_dir, overrides, int(cfg.seed))
    return summarize(records, sweep_cfg["metric"], sweep_dir)


def _resume_sweep(name_or_path: str | Path, sweep_dir: Path, overrides: list[str]) -> list[TrialRecord]:
    """Continue the offline sweep in ``sweep_dir`` (see :func:`run_sweep`)."""
    saved = sweep_dir / "sweep.yaml"
    if not saved.exists():
        raise WSIError(f"--resume {sweep_dir}: not a sweep folder (no sweep.yaml); pass "
                       "runs/sweeps/<sweep>/<timestamp>")
    resolved = yaml.safe_load(saved.read_text())
    if resolved.get("mode") != "offline":
        raise WSIError(f"--resume {sweep_dir}: an online (W&B server) sweep; resume it with "
                       f"`wandb agent {resolved.get('sweep_id', '<sweep id>')}`")
    path = sweep_path(name_or_path)
    sweep_cfg, _ = _load(path, [])
    now = json.loads(json.dumps(dict(sweeps.SweepConfig(wandb_part(sweep_cfg))), default=str))
    keys = ("method", "metric", "parameters", "early_terminate")
    if any(now.get(k) != resolved.get(k) for k in keys):
        raise WSIError(f"--resume {sweep_dir}: {path} has changed since that sweep started "
                       "(method, metric or parameters differ); start a new sweep")
    refused = config.non_execution_keys(config.parse_overrides(overrides))
    if refused:
        raise WSIError(f"--resume {sweep_dir}: override(s) {refused} would change the trials; only "
                       "execution settings (trainer.num_threads, data.num_workers, logger.*) may change")
    trial_over = [*resolved.get("overrides", []), *overrides]
    log.info("resuming sweep %s in %s", path.stem, sweep_dir)
    records = _run_offline({**sweep_cfg, "overrides": []}, resolved.get("count"), sweep_dir, trial_over,
                           int(resolved["seed"]))
    return summarize(records, sweep_cfg["metric"], sweep_dir)


def _new_sweep_dir(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d, i = base / stamp, 1
    while d.exists():
        d, i = base / f"{stamp}-{i}", i + 1
    d.mkdir(parents=True)
    return d


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))


def _run_offline(sweep_cfg: dict, count: int | None, sweep_dir: Path, overrides: list[str],
                 seed: int) -> list[TrialRecord]:
    """Local agent: propose with the ``sweeps`` engine, run, record, repeat."""
    wb, metric = wandb_part(sweep_cfg), sweep_cfg["metric"]["name"]
    rng, records, runs, failures = ProposalRNG(seed), [], [], 0
    hyperband = "early_terminate" in wb
    while count is None or len(records) < count:
        params = propose(wb, runs, rng)
        if params is None:
            log.info("grid exhausted after %d trials", len(records))
            break
        name = f"trial_{len(records):03d}"
        trial_dir = sweep_dir / name
        if (trial_dir / TRIAL_FILE).exists():  # a resumed sweep: this trial finished before
            rec = _read_record(trial_dir / TRIAL_FILE)
            if rec.params != params:
                raise WSIError(f"{trial_dir}: recorded parameters {rec.params} differ from the replayed "
                               f"proposal {params}; the sweep cannot be resumed, start a new one")
            log.info("%s (%d/%s): done before (%s)", name, len(records) + 1, count or "grid", rec.state)
        else:
            resume = (trial_dir / "checkpoints" / "last.ckpt").exists() and not (trial_dir / "metrics.json").exists()
            if trial_dir.exists() and not resume:
                import shutil

                shutil.rmtree(trial_dir)  # started but no epoch finished: start it again
            log.info("%s (%d/%s): %s%s", name, len(records) + 1, count or "grid", params,
                     " (resuming its interrupted fit)" if resume else "")
            try:
                rec = _guarded_trial(sweep_cfg, params, name, sweep_dir, overrides,
                                     list(runs) if hyperband else None, resume=resume)
            finally:
                _finish_wandb_run()
        records.append(rec)
        runs.append(to_sweep_run(rec, metric))
        failures = failures + 1 if rec.state == "failed" else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            summarize(records, sweep_cfg["metric"], sweep_dir)
            raise WSIError(f"{failures} trials in a row failed (last: {rec.error}); see the log "
                           f"above and {sweep_dir}")
    return records


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


def summarize(records: list[TrialRecord], metric: dict, sweep_dir: Path) -> list[TrialRecord]:
    """Rank the trials, write ``trials.csv`` into the sweep folder and print a table."""
    ranked = rank(records, metric["goal"])
    params = sorted({k for r in records for k in r.params})
    tests = sorted({k for r in records for k in r.metrics} - {metric["name"]})
    with (sweep_dir / "trials.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "trial", "state", metric["name"], *params, *tests, "run_dir"])
        for i, r in enumerate(ranked, 1):
            out.writerow([i, r.name, r.state, r.metric, *(r.params.get(k) for k in params),
                          *(r.metrics.get(k) for k in tests), r.run_dir])
    _print_table(ranked, metric, params, sweep_dir)
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
