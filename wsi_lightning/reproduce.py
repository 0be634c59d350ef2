"""Run a paper's table spec and write our numbers beside the paper's.

A spec (``experiments/tables/<paper>.yaml``) names the rows (experiment + overrides), seeds,
columns (metric keys) and the paper's published numbers, plus the datasets it can run on
(``demo`` = the built-in synthetic data; others add overrides such as ``data.manifest``);
datasets listed in ``split_per_seed`` also vary ``data.split.seed`` with the seed (the
k-split protocols, e.g. CS-MIL's 10 train/val splits around a fixed test set).
Every (row, seed) is a normal run in a fixed folder ``<runs>/reproduce/<paper>/<dataset>/
<row>/seed<k>``; a folder whose ``metrics.json`` has every column and whose
``config.resolved.yaml`` matches the row's config is skipped, so an interrupted ``make
reproduce`` resumes and a changed row is redone. Results: ``results/<paper>.md`` / ``.csv`` (``<paper>.<dataset>.*``
for datasets other than demo) and ROC curves per row (``<paper>_roc.png``).

Launchers (``wsi reproduce --launcher``): ``local`` runs the fits in this process or, with
``--jobs N``, in N spawned worker processes; ``slurm`` submits one SLURM job per (row, seed), as
one job array, through submitit, and waits for them (``submitit-local`` does the same with
submitit's local executor: jobs as processes of this machine, to try a table's launch here).
The resources of each job come from the spec's ``slurm:`` block and the ``--slurm-*`` options
(:class:`SlurmSettings`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from wsi_lightning import config
from wsi_lightning.errors import ConfigError, WSIError

log = logging.getLogger(__name__)
TABLES_DIR = config.EXPERIMENTS_DIR / "tables"
SPEC_KEYS = {"title", "seeds", "datasets", "columns", "rows", "notes", "compare_to", "split_per_seed", "slurm"}
LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass
class Cell:
    values: list[float]
    paper: float | None

    def mean_std(self) -> tuple[float, float]:
        v = np.array([x for x in self.values if np.isfinite(x)], dtype=float)
        return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (np.nan, np.nan)


def list_tables() -> list[str]:
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def load_spec(name: str) -> dict:
    """Read and check a table spec (every row's experiment and overrides are loaded once)."""
    path = Path(name) if name.endswith(".yaml") else TABLES_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown table '{name}' (no {path}); available: {list_tables()}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"table {path}: unknown key(s) {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    for key in ("seeds", "columns", "rows"):
        if not spec.get(key):
            raise ConfigError(f"table {path}: '{key}' is missing or empty")
    spec.setdefault("datasets", {"demo": []})
    spec["name"], spec["path"] = path.stem, path
    SlurmSettings.merged(spec.get("slurm"), None, f"table {path}: slurm")  # fails early on bad keys

    def check_overrides(items: Any, where: str) -> None:
        for item in items or []:
            config.check_override(item, f"table {path}: {where}")

    for ds, items in spec["datasets"].items():
        check_overrides(items, f"datasets.{ds}")
    for i, row in enumerate(spec["rows"]):
        for k in ("name", "experiment"):
            if k not in row:
                raise ConfigError(f"table {path}: rows[{i}] needs '{k}'")
        extra = set(row) - {"name", "experiment", "overrides", "dataset_overrides", "paper", "paper_p"}
        if extra:
            raise ConfigError(f"table {path}: rows[{i}] has unknown key(s) {sorted(extra)}; valid: "
                              "name, experiment, overrides, dataset_overrides, paper, paper_p")
        unknown = set(row.get("dataset_overrides") or {}) - set(spec["datasets"])
        if unknown:
            raise ConfigError(f"table {path}: rows[{i}] ({row['name']}) has dataset_overrides for "
                              f"unlisted dataset(s) {sorted(unknown)}; datasets: {sorted(spec['datasets'])}")
        bad = set(row.get("paper", {}) or {}) - set(spec["columns"])
        if bad:
            raise ConfigError(f"table {path}: rows[{i}] ({row['name']}) has paper numbers for unknown "
                              f"column(s) {sorted(bad)}; columns: {sorted(spec['columns'])}")
        check_overrides(row.get("overrides"), f"rows[{i}] ({row['name']}) overrides")
        for ds, items in (row.get("dataset_overrides") or {}).items():
            check_overrides(items, f"rows[{i}] ({row['name']}) dataset_overrides.{ds}")
        config.load(row["experiment"], list(row.get("overrides", [])))  # fails early on bad keys
    return spec


def _row_dir(spec: dict, dataset: str, row: dict, seed: int, runs: Path) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in row["name"])
    return runs / "reproduce" / spec["name"] / dataset / slug / f"seed{seed}"


def _resumable(run_dir: Path, cfg: DictConfig) -> bool:
    """An interrupted run (a ``last.ckpt``, no ``metrics.json``) of this very config."""
    saved = run_dir / "config.resolved.yaml"
    if (run_dir / "metrics.json").exists() or not (run_dir / "checkpoints" / "last.ckpt").exists() or not saved.exists():
        return False
    return not config.changed_keys(yaml.safe_load(saved.read_text()), OmegaConf.to_container(cfg, resolve=True))


def _complete(run_dir: Path, metrics: list[str], cfg: DictConfig) -> dict | None:
    """The run's metrics if it finished under the same config, else None (a run made before a
    change of the spec, the experiment YAML or the demo data is redone).

    ``metrics.json`` is written (atomically) only once a run has tested, so its presence means
    the run finished. A column the run lacks is a metric its method does not log (HAG-MIL's
    recall on a finest-level baseline): the cell stays empty and the run is not redone. A
    column added by a new callback is a config change, so those runs are redone anyway."""
    p = run_dir / "metrics.json"
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("%s: unreadable metrics.json; running it again", run_dir)
        return None
    missing = [k for k in metrics if k not in m]
    if missing:
        log.info("%s does not log %s (the cells stay empty)", run_dir, ", ".join(missing))
    saved = run_dir / "config.resolved.yaml"
    changed = config.changed_keys(yaml.safe_load(saved.read_text()) if saved.exists() else {},
                            OmegaConf.to_container(cfg, resolve=True))
    if changed:
        log.warning("%s was run with another config (%s); running it again", run_dir, ", ".join(changed[:8]))
        return None
    return m


def run_table(name: str, dataset: str = "demo", seeds: list[int] | None = None, runs: Path | None = None,
              results: Path = Path("results"), extra_overrides: list[str] | None = None,
              jobs: int | None = None, launcher: str = "local", slurm: dict[str, Any] | None = None) -> Path:
    """Run every (row, seed) of a table that is not complete yet, then write the results.

    ``jobs``: run up to this many (row, seed) fits at once (default: one, locally; all the
    array holds, on SLURM). Locally each runs in its own process with ``trainer.num_threads`` =
    the CPU cores / ``jobs`` (unless set) and, on a machine with GPUs, a GPU of its own
    (``jobs`` <= the GPUs). ``launcher``: ``local``, ``slurm`` or ``submitit-local`` (see the
    module docstring); ``slurm``: the ``--slurm-*`` options (:class:`SlurmSettings` fields),
    over the spec's ``slurm:`` block. The data of the table (demo slides, feature stores) is
    prepared once, before the runs start (under SLURM on the submitting node, or with
    ``prepare: job`` in a first job of its own).

    Returns:
        The markdown results file.
    """
    spec = load_spec(name)
    if dataset not in spec["datasets"]:
        raise ConfigError(f"table {spec['path']}: dataset '{dataset}' not listed; available: {sorted(spec['datasets'])}")
    if jobs is not None and int(jobs) < 1:
        raise ConfigError(f"--jobs {jobs}; expected an integer >= 1")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}; expected one of {list(LAUNCHERS)}")
    settings = SlurmSettings.merged(spec.get("slurm"), slurm, f"table {spec['path']}: slurm")
    seeds = list(seeds if seeds is not None else spec["seeds"])
    data_over = list(spec["datasets"][dataset] or []) + list(extra_overrides or [])
    if runs is None:  # paths.runs of the (overridden) config
        first = spec["rows"][0]
        runs = Path(config.load(first["experiment"], [*first.get("overrides", []), *data_over]).paths.runs)
    metrics = [c["metric"] for c in spec["columns"].values()]
    collected: dict[str, list[dict]] = {}
    todo: list[Job] = []
    t0 = time.perf_counter()
    for row in spec["rows"]:
        for seed in seeds:
            run_dir = _row_dir(spec, dataset, row, seed, runs)
            row_data = list((row.get("dataset_overrides") or {}).get(dataset) or [])
            over = [*row.get("overrides", []), *row_data, *data_over, f"seed={seed}"]
            if dataset in (spec.get("split_per_seed") or []):  # one train/val split per seed
                over.append(f"data.split.seed={seed}")
            cfg = config.load(row["experiment"], over, demo=(dataset == "demo"))
            # one W&B group per table and dataset; the row is the job type, the seed the run's name
            w = cfg.logger.wandb
            w.group = w.group or f"table/{spec['name']}/{dataset}"
            w.job_type = w.job_type or str(row["name"])
            done = _complete(run_dir, metrics, cfg)
            collected.setdefault(row["name"], []).append({"seed": seed, "run_dir": run_dir, **(done or {})})
            if done is not None:
                log.info("table %s: %s, seed %d already complete (%s)", spec["name"], row["name"], seed, run_dir)
                continue
            resume = _resumable(run_dir, cfg)
            if not resume:
                shutil.rmtree(run_dir, ignore_errors=True)  # an outdated run is redone
            todo.append(Job(spec["name"], str(row["name"]), seed, cfg, run_dir, resume))
    if launcher == "local":
        results_of = _run_jobs(todo, int(jobs or 1))
    else:
        folder = runs / "reproduce" / spec["name"] / dataset / "_submitit"
        results_of = _run_submitit(todo, jobs, launcher, settings, folder)
    for job, m in zip(todo, results_of, strict=True):
        for entry in collected[job.row]:
            if entry["seed"] == job.seed:
                entry.update(m)
    log.info("table %s: all runs done in %.0f s (%d run, launcher %s, %s at a time)", spec["name"],
             time.perf_counter() - t0, len(todo), launcher, jobs or (1 if launcher == "local" else "all"))
    return write_results(spec, dataset, collected, results)


@dataclass
class Job:
    """One (row, seed) fit of a table that is not complete."""

    table: str
    row: str
    seed: int
    cfg: DictConfig
    run_dir: Path
    resume: bool


def _fit_job(cfg_yaml: str, run_dir: str, resume: bool) -> dict[str, float]:
    """Run one table fit (in this process or a worker process); its test metrics."""
    from wsi_lightning import run

    cfg = OmegaConf.create(cfg_yaml)
    return run.fit(cfg, run_dir=Path(run_dir), resume=resume).metrics


def _run_jobs(todo: list[Job], jobs: int) -> list[dict[str, float]]:
    """The jobs' metrics, in order: one after another, or ``jobs`` at a time in worker processes
    (spawned: each has its own Lightning, torch threads and device)."""
    if jobs == 1 or len(todo) <= 1:
        out = []
        for j in todo:
            log.info("table %s: %s, seed %d -> %s%s", j.table, j.row, j.seed, j.run_dir,
                     " (resuming the interrupted run)" if j.resume else "")
            out.append(_fit_job(OmegaConf.to_yaml(j.cfg), str(j.run_dir), j.resume))
        return out
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from wsi_lightning import build

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for i, j in enumerate(todo):
        if j.cfg.trainer.num_threads is None:
            j.cfg.trainer.num_threads = threads
        j.cfg.data.num_workers = min(int(j.cfg.data.num_workers), threads)
        if gpus and str(j.cfg.trainer.accelerator) in ("auto", "gpu", "cuda"):  # a GPU each
            j.cfg.trainer.devices = [i % gpus]
    build.prepare_shared_data([j.cfg for j in todo])
    log.info("table %s: %d runs, %d at a time (%d threads each%s)", todo[0].table, len(todo), jobs, threads,
             f", GPUs {list(range(min(jobs, gpus)))}" if gpus else "")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = []
        for j in todo:
            log.info("table %s: %s, seed %d -> %s%s", j.table, j.row, j.seed, j.run_dir,
                     " (resuming)" if j.resume else "")
            futures.append(pool.submit(_fit_job, OmegaConf.to_yaml(j.cfg), str(j.run_dir), j.resume))
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------- SLURM (submitit)
@dataclass
class SlurmSettings:
    """Resources of each job of ``--launcher slurm``: the spec's ``slurm:`` block, then the
    ``--slurm-*`` options (``--slurm-gpus-per-job 1`` is ``gpus_per_job``).

    Attributes:
        partition, account, qos: sbatch's ``--partition``, ``--account``, ``--qos``.
        gpus_per_job: 0 or 1 (a table's runs are single-device fits).
        cpus_per_job: sbatch's ``--cpus-per-task``; also the run's ``trainer.num_threads``
            (unless the row sets it). Default: the cluster's.
        mem_gb: memory per job. time_min: time limit per job in minutes (a job that reaches it
            is requeued, up to 3 times, and resumes its fit from ``last.ckpt``).
        setup: shell lines each job runs first (``module load cuda``).
        additional: any other sbatch option, ``{constraint: a100, exclude: node7}``.
        prepare: ``here`` (the table's stores are made by the submitting process, before
            submission) or ``job`` (by a first job with these resources; the runs are submitted
            when it ends).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    time_min: int = 240
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)
    prepare: str = "here"

    @classmethod
    def merged(cls, spec: dict | None, cli: dict | None, where: str) -> SlurmSettings:
        """The spec's ``slurm:`` block (``where`` names it in errors) with the ``--slurm-*``
        options over it (a None option: not given); a bad key or value names its source."""
        names = [f.name for f in fields(cls)]
        out = cls()
        for source, block in ((where, spec), ("--slurm-* options", cli)):
            if block is not None and not isinstance(block, dict):
                raise ConfigError(f"{source}: expected a mapping with keys among {names}")
            for key, value in (block or {}).items():
                if key not in names:
                    raise ConfigError(f"{source}: unknown key '{key}'; valid: {names}")
                if value is not None:
                    setattr(out, key, value)
            out._check(source)
        return out

    def _check(self, where: str) -> None:
        for key in ("cpus_per_job", "mem_gb", "time_min"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{where}: {key}={v!r}; expected an integer >= 1")
        if self.gpus_per_job not in (0, 1) or isinstance(self.gpus_per_job, bool):
            raise ConfigError(f"{where}: gpus_per_job={self.gpus_per_job!r}; expected 0 or 1 (a table's runs are "
                              "single-device fits; for a multi-GPU fit see docs/slurm/fit_multinode.sbatch)")
        if self.prepare not in ("here", "job"):
            raise ConfigError(f"{where}: prepare={self.prepare!r}; expected 'here' or 'job'")
        if not isinstance(self.setup, list) or not isinstance(self.additional, dict):
            raise ConfigError(f"{where}: setup must be a list of shell lines and additional a mapping")


class _TableFit:
    """One (row, seed) fit as a submitit job. On a SLURM time-out (or preemption) submitit calls
    :meth:`checkpoint`, and the requeued job resumes the fit from its ``last.ckpt``."""

    def __call__(self, cfg_yaml: str, run_dir: str, resume: bool) -> dict[str, float]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        done = Path(run_dir) / "metrics.json"
        if resume and done.exists():  # the time-out came after the test
            return json.loads(done.read_text())["metrics"]
        cfg = OmegaConf.create(cfg_yaml)
        if cfg.trainer.num_threads is None and hasattr(os, "sched_getaffinity"):  # the job's CPUs
            cfg.trainer.num_threads = len(os.sched_getaffinity(0))
            cfg.data.num_workers = min(int(cfg.data.num_workers), int(cfg.trainer.num_threads))
        return _fit_job(OmegaConf.to_yaml(cfg), run_dir, resume)

    def checkpoint(self, cfg_yaml: str, run_dir: str, resume: bool) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, cfg_yaml, run_dir, True)


def _prepare_job(cfg_yamls: list[str]) -> None:
    """``prepare: job``: the table's stores, made in a job of their own."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from wsi_lightning import build

    build.prepare_shared_data([OmegaConf.create(y) for y in cfg_yamls])


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def _executor(launcher: str, s: SlurmSettings, folder: Path, name: str) -> Any:
    """A submitit executor for ``--launcher slurm`` (sbatch) or ``submitit-local`` (processes
    of this machine), its jobs' files (scripts, pickles, logs) under ``folder/<job id>/``."""
    try:
        import submitit
    except ImportError:
        raise WSIError(f"--launcher {launcher} needs the submitit package: pip install submitit==1.5.4 "
                       "(a dependency in pyproject.toml: pip install -e . installs it)") from None
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise WSIError("--launcher slurm: no sbatch on PATH, so this is not a SLURM submit node; run the "
                       "command on the cluster's login node (or inside an sbatch job), or here with "
                       "--jobs N (local processes) or --launcher submitit-local")
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if launcher == "slurm" else "local")
    params: dict[str, Any] = {"name": name, "timeout_min": s.time_min, "nodes": 1, "tasks_per_node": 1,
                              "gpus_per_node": s.gpus_per_job}
    if s.cpus_per_job:
        params["cpus_per_task"] = s.cpus_per_job
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if launcher == "slurm":
        params.update({f"slurm_{k}": getattr(s, k) for k in ("partition", "account", "qos") if getattr(s, k)})
        params.update(slurm_setup=list(s.setup), slurm_additional_parameters=dict(s.additional))
    ex.update_parameters(**params)
    return ex


def _run_submitit(todo: list[Job], jobs: int | None, launcher: str, s: SlurmSettings,
                  folder: Path) -> list[dict[str, float]]:
    """The jobs' metrics, in order, from one submitit job each (one job array on SLURM, at most
    ``jobs`` running at once); the table's data is prepared first (:class:`SlurmSettings`
    ``prepare``). A failed job fails the table once every job has ended, naming its log."""
    if not todo:
        return []
    ex = _executor(launcher, s, folder, f"wsi-{todo[0].table}")
    at_once = int(jobs or len(todo))
    _refuse_active(folder, todo, launcher)
    cpus = s.cpus_per_job or (max(1, (os.cpu_count() or 1) // at_once) if launcher != "slurm" else None)
    for j in todo:
        if cpus and j.cfg.trainer.num_threads is None:
            j.cfg.trainer.num_threads = cpus
            j.cfg.data.num_workers = min(int(j.cfg.data.num_workers), cpus)
    if s.prepare == "job":
        prep = ex.submit(_prepare_job, [OmegaConf.to_yaml(j.cfg) for j in todo])
        log.info("table %s: preparing the data in job %s (log %s)", todo[0].table, prep.job_id, prep.paths.stdout)
        _wait([prep], ["data preparation"], launcher)
    else:
        from wsi_lightning import build

        build.prepare_shared_data([j.cfg for j in todo])
    args = [(OmegaConf.to_yaml(j.cfg), str(j.run_dir.resolve()), j.resume) for j in todo]
    what = [f"{j.row}, seed {j.seed}" for j in todo]
    if launcher == "slurm":
        ex.update_parameters(slurm_array_parallelism=at_once)
        submitted = ex.map_array(_TableFit(), *zip(*args, strict=True))
        _record_jobs(folder, todo, submitted)
        for w, job in zip(what, submitted, strict=True):
            log.info("table %s: %s -> SLURM job %s", todo[0].table, w, job.job_id)
        log.info("table %s: %d jobs submitted (at most %d at once); logs in %s", todo[0].table, len(todo),
                 at_once, folder)
        return _wait(submitted, what, launcher)
    return _wait_local(ex, args, what, at_once, todo[0].table)


def _wait_local(ex: Any, args: list[tuple], what: list[str], at_once: int, table: str) -> list[dict[str, float]]:
    """submitit-local: at most ``at_once`` jobs alive, the next submitted when one ends."""
    submitted: list[Any] = []
    while len(submitted) < len(args) or not all(j.done() for j in submitted):
        while len(submitted) < len(args) and sum(not j.done() for j in submitted) < at_once:
            job = ex.submit(_TableFit(), *args[len(submitted)])
            log.info("table %s: %s -> local job %s (log %s)", table, what[len(submitted)], job.job_id, job.paths.stdout)
            submitted.append(job)
        time.sleep(1.0)
    return _wait(submitted, what, "submitit-local")


def _wait(submitted: list[Any], what: list[str], launcher: str) -> list[Any]:
    """Every job's result, in order, once all have ended; a WSIError names each failed job."""
    from submitit.helpers import as_completed

    results: dict[int, Any] = {}
    failed: list[str] = []
    index = {id(j): k for k, j in enumerate(submitted)}
    for job in as_completed(submitted, poll_frequency=30 if launcher == "slurm" else 1):
        k = index[id(job)]
        try:
            results[k] = job.result()
            log.info("%s: done (job %s, %d of %d)", what[k], job.job_id, len(results), len(submitted))
        except Exception as err:  # a failed or cancelled job: the others go on
            failed.append(f"{what[k]} (job {job.job_id}, log {job.paths.stderr}): {str(err).strip()[-300:]}")
            log.error("%s failed: see %s", what[k], job.paths.stderr)
    if failed:
        raise WSIError(f"{len(failed)} of {len(submitted)} job(s) failed:\n  " + "\n  ".join(failed) +
                       "\nrerun the same command: finished runs are kept, interrupted ones resume")
    return [results[k] for k in range(len(submitted))]


def _record_jobs(folder: Path, todo: list[Job], submitted: list[Any]) -> None:
    """``folder/jobs.json``: the SLURM job of each run folder, for :func:`_refuse_active`."""
    path = folder / "jobs.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update({str(j.run_dir.resolve()): str(job.job_id) for j, job in zip(todo, submitted, strict=True)})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, path)


def _slurm_state(folder: Path, job_id: str) -> str:
    """A SLURM job's state (sacct, through submitit); UNKNOWN when SLURM does not say."""
    from submitit import SlurmJob

    return str(SlurmJob(folder=folder / "%j", job_id=job_id).get_info().get("State", "UNKNOWN")).split()[0]


def _refuse_active(folder: Path, todo: list[Job], launcher: str) -> None:
    """An earlier submission's jobs still pending or running for these runs (their submitting
    process was stopped) would write into the same folders: refuse, naming them."""
    path = folder / "jobs.json"
    if launcher != "slurm" or not path.is_file():
        return
    known = json.loads(path.read_text())
    ids = [known[str(j.run_dir.resolve())] for j in todo if str(j.run_dir.resolve()) in known]
    active = [i for i in ids if _slurm_state(folder, i) in ACTIVE]
    if active:
        raise WSIError(f"SLURM job(s) {active} of an earlier `wsi reproduce --launcher slurm` still run the same "
                       f"runs ({path}); wait for them to end (squeue --me) or scancel them, then rerun")


def _cells(spec: dict, collected: dict[str, list[dict]]) -> list[dict]:
    out = []
    for row in spec["rows"]:
        recs = collected.get(row["name"], [])
        for col, c in spec["columns"].items():
            cell = Cell([float(r.get(c["metric"], np.nan)) for r in recs], (row.get("paper") or {}).get(col))
            mean, std = cell.mean_std()
            out.append({"row": row["name"], "experiment": row["experiment"], "column": col,
                        "label": c.get("label", col), "metric": c["metric"], "mean": mean, "std": std,
                        "n_seeds": len(cell.values), "values": " ".join(f"{v:.4f}" for v in cell.values),
                        "paper": cell.paper})
    return out


def write_results(spec: dict, dataset: str, collected: dict[str, list[dict]], results: Path) -> Path:
    """Markdown + CSV tables (ours mean +- std | paper) and ROC curves per row."""
    results.mkdir(parents=True, exist_ok=True)
    stem = spec["name"] if dataset == "demo" else f"{spec['name']}.{dataset}"
    cells = pd.DataFrame(_cells(spec, collected))
    cells.insert(0, "dataset", dataset)
    cells.to_csv(results / f"{stem}.csv", index=False)
    cols = list(spec["columns"])
    head = "| Row | " + " | ".join(spec["columns"][c].get("label", c) for c in cols) + " |"
    lines = [f"# {spec.get('title', spec['name'])}", "",
             f"Dataset: **{dataset}**{' (built-in synthetic demo data, not the paper data)' if dataset == 'demo' else ''}. "
             f"Seeds: {sorted({r['seed'] for rs in collected.values() for r in rs})}. "
             "Cells: ours mean +- std over seeds / paper.", "",
             f"Command: `make reproduce TABLE={spec['name']} DATA={dataset}` "
             f"(or `wsi reproduce {spec['name']} --data {dataset}`)", "", head,
             "|" + "---|" * (len(cols) + 1)]
    for row in spec["rows"]:
        sub = cells[cells["row"] == row["name"]].set_index("column")
        parts = []
        for c in cols:
            m, s, p = sub.loc[c, "mean"], sub.loc[c, "std"], sub.loc[c, "paper"]
            ours = "n/a" if not np.isfinite(m) else f"{_num(m)} +- {_num(s)}"
            parts.append(f"{ours} / {'-' if p is None or pd.isna(p) else _num(float(p))}")
        lines.append(f"| {row['name']} (`{row['experiment']}`) | " + " | ".join(parts) + " |")
    if spec.get("notes"):
        lines += ["", str(spec["notes"]).strip()]
    if spec.get("compare_to"):
        lines += ["", *_comparison(spec, collected, results / f"{stem}_tests.csv")]
    roc = _plot_roc(spec, collected, results / f"{stem}_roc.png")
    if roc:
        lines += ["", f"ROC curves per row: `{roc.name}`"]
    lines += ["", "Runs: " + ", ".join(sorted({str(Path(r['run_dir']).parent.parent) for rs in collected.values() for r in rs}))]
    md = results / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    log.info("wrote %s and %s", md, results / f"{stem}.csv")
    return md


def _ensemble_predictions(recs: list[dict]) -> pd.DataFrame | None:
    """Positive-class probability per test slide (per case, for patient-level runs), averaged
    over the seeds' runs (binary only), indexed by the id."""
    frames = []
    for rec in recs:
        p = Path(rec["run_dir"]) / "test_predictions.csv"
        if p.exists():
            df = pd.read_csv(p, dtype={"slide_id": str, "case_id": str})
            probs = [c for c in df.columns if c.startswith("prob_")]
            if len(probs) != 2:
                return None
            key = "case_id" if "case_id" in df.columns else "slide_id"  # data.bag_level=case: a row per case
            frames.append(pd.DataFrame({"id": df[key], "y": (df["label"].astype(str) == probs[1][5:]).astype(int),
                                        "p": df[probs[1]]}))
    if not frames:
        return None
    return pd.concat(frames).groupby("id").agg(y=("y", "first"), p=("p", "mean")).sort_index()


def _num(v: float) -> str:
    """Metrics with 3 decimals; counts (whole numbers >= 1000, e.g. pixels) as 2,803,584."""
    return f"{v:,.0f}" if abs(v) >= 1000 and float(v).is_integer() else f"{v:.3f}"


def _comparison(spec: dict, collected: dict[str, list[dict]], path: Path) -> list[str]:
    """DeLong and paired-bootstrap tests of every row against ``compare_to`` (seed-averaged
    predictions on the same test slides), beside the paper's p-values (``paper_p``)."""
    from wsi_lightning.analysis.stats import compare_to_reference

    ref = spec["compare_to"]
    preds = {}
    for row in spec["rows"]:
        df = _ensemble_predictions(collected.get(row["name"], []))
        if df is not None:
            preds[row["name"]] = df
    if ref not in preds:
        return [f"Comparison against {ref}: no binary test predictions for the reference row."]
    common = sorted(set.intersection(*(set(d.index) for d in preds.values())))
    aligned = {k: (d.loc[common, "y"].to_numpy(), d.loc[common, "p"].to_numpy()) for k, d in preds.items()}
    table = compare_to_reference(aligned, ref)
    paper = {r["name"]: r.get("paper_p") or {} for r in spec["rows"]}
    table["paper_p_auc"] = [paper.get(k, {}).get("auc") for k in table.index]
    table["paper_p_ap"] = [paper.get(k, {}).get("ap") for k in table.index]
    table.to_csv(path)
    out = [f"## Tests against {ref} (seed-averaged probabilities, {len(common)} test slides)", "",
           "| Row | AUC | AP | p DeLong (AUC) | p bootstrap (AUC) | p bootstrap (AP) | paper p (AUC / AP) |",
           "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "Ref." if pd.isna(v) else f"{v:.3f}"  # noqa: E731
    pfmt = lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}"  # noqa: E731
    for name, r in table.iterrows():
        pp = "Ref. / Ref." if name == ref else f"{pfmt(r['paper_p_auc'])} / {pfmt(r['paper_p_ap'])}"
        out.append(f"| {name} | {r['AUC']:.3f} | {r['AP']:.3f} | {fmt(r['p_delong'])} | {fmt(r['p_boot_auc'])} | "
                   f"{fmt(r['p_boot_ap'])} | {pp} |")
    return out


def _plot_roc(spec: dict, collected: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per row, one curve per seed, from each run's test_predictions.csv (binary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    rows = [r for r in spec["rows"] if collected.get(r["name"])]
    ncol = min(len(rows), 5)
    nrow = -(-len(rows) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 4 * nrow), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    drawn = False
    for ax, row in zip(axes.flat, rows, strict=False):
        for rec in collected[row["name"]]:
            p = Path(rec["run_dir"]) / "test_predictions.csv"
            if not p.exists():
                continue
            df = pd.read_csv(p)
            probs = [c for c in df.columns if c.startswith("prob_")]
            if len(probs) != 2:
                continue
            y = (df["label"].astype(str) == probs[1][5:]).astype(int)
            if y.nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(y, df[probs[1]])
            ax.plot(fpr, tpr, lw=1.2, label=f"seed {rec['seed']} (AUC {roc_auc_score(y, df[probs[1]]):.3f})")
            drawn = True
        ax.plot([0, 1], [0, 1], "k--", lw=0.6)
        ax.set(title=row["name"], xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
