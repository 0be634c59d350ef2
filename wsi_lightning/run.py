"""Plain functions the CLI and tests call: ``fit(cfg)``, ``resume(run_dir)`` and ``test(run_dir)``.

A run folder holds ``checkpoints/best.ckpt`` (the monitored metric's best) and
``checkpoints/last.ckpt`` (rewritten at the end of every epoch, atomically, with the random
number generators' states), so an interrupted fit continues with ``resume(run_dir)`` /
``wsi fit EXP --resume RUN_DIR`` from its last finished epoch and ends as an uninterrupted run
with the same seed would.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from wsi_lightning import build
from wsi_lightning.config import save_resolved
from wsi_lightning.errors import WSIError
from wsi_lightning.methods.base import SlideEstimator

log = logging.getLogger(__name__)
RUN_DIR_ENV = "WSI_RUN_DIR"
FAILED = "failed.json"  # written into a run folder whose fit raised
SHARD_DONE = "shard.json"  # written into a `wsi predict --shard` folder once all its slides are done


@dataclass
class RunResult:
    """Where a run landed and what it measured."""

    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None


def _is_ddp_child() -> bool:
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK"))


def new_run_dir(cfg: DictConfig) -> Path:
    """``<paths.runs>/<name>/<timestamp>`` (``-1``, ``-2``, ... when taken), created here so that
    two runs started in the same second never share a folder; DDP child processes reuse their
    parent's folder, and under torchrun / SLURM every process gets global rank 0's."""
    from wsi_lightning.build import launch_group

    if launch_group() is not None:  # every process of the job is up: rank 0 names the folder
        import torch.distributed as dist

        name = [str(_create_run_dir(cfg)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(name, src=0)
        return Path(name[0])
    if _is_ddp_child() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    return _create_run_dir(cfg)


def _create_run_dir(cfg: DictConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.paths.runs) / str(cfg.name)
    base.mkdir(parents=True, exist_ok=True)
    run_dir, i = base / stamp, 1
    while True:
        try:
            run_dir.mkdir()  # atomic: exactly one process creates a given folder
            return run_dir
        except FileExistsError:
            run_dir, i = base / f"{stamp}-{i}", i + 1


def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def _left_out(dm: object) -> dict[str, float]:
    """``test/slides_left_out``: test slides the store lacks (failed with ``skip_errors``)."""
    return {"test/slides_left_out": float(len(getattr(dm, "left_out", {}).get("test", [])))}


def _callback_metrics(trainer: L.Trainer) -> dict[str, float]:
    out: dict[str, float] = {}
    for cb in trainer.callbacks:
        m = getattr(cb, "metrics", None)
        if isinstance(m, dict):
            out.update({k: float(v) for k, v in m.items()})
    return out


def resume_config(run_dir: str | Path, overrides: list[str] | None = None, exp: str | None = None) -> DictConfig:
    """The saved config of a run folder, for resuming it. Only overrides of how the run
    executes (``config.EXECUTION_KEYS``: threads, workers, loggers, paths) are accepted; one
    that changes the model or the data would make the resumed run a different run."""
    from wsi_lightning.config import check_keys, non_execution_keys, parse_overrides

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.resolved.yaml"
    if not cfg_path.exists():
        raise WSIError(f"--resume {run_dir}: not a run folder (no config.resolved.yaml); pass the "
                       "runs/<exp>/<timestamp> folder of the interrupted fit")
    cfg = OmegaConf.load(cfg_path)
    if exp is not None and Path(exp).stem != str(cfg.name):
        raise WSIError(f"--resume {run_dir}: that folder is a run of '{cfg.name}', not of '{exp}'; "
                       f"run wsi fit {cfg.name} --resume {run_dir}")
    cli = parse_overrides(overrides)
    refused = non_execution_keys(cli)
    if refused:
        raise WSIError(f"--resume {run_dir}: override(s) {refused} change what the run computes; a "
                       "resumed run keeps its saved config (config.resolved.yaml). Only execution "
                       "settings may change (trainer.num_threads, data.num_workers, logger.*, paths.*); "
                       "start a new run for the others")
    check_keys(cfg, cli, "command-line overrides")
    return OmegaConf.merge(cfg, cli)


def resume(run_dir: str | Path, overrides: list[str] | None = None, exp: str | None = None,
           extra_callbacks: list[L.Callback] | None = None) -> RunResult:
    """Continue an interrupted fit in its own folder from ``checkpoints/last.ckpt`` (or from the
    start, in the same folder, when it stopped before its first epoch ended)."""
    return fit(resume_config(run_dir, overrides, exp), run_dir=Path(run_dir), extra_callbacks=extra_callbacks,
               resume=True)


def fit(cfg: DictConfig, run_dir: Path | None = None,
        extra_callbacks: list[L.Callback] | None = None, resume: bool = False) -> RunResult:
    """Prepare data (tile + extract what is missing), train, test the best checkpoint.

    Writes into the run folder: ``config.resolved.yaml``, ``checkpoints/``, ``metrics.csv``
    (CSV logger), ``val_predictions.csv`` / ``test_predictions.csv`` and ``metrics.json``.
    ``extra_callbacks`` are appended to the configured ones (e.g. a sweep's early stopping).
    Callbacks exposing a ``metrics`` dict (e.g. feature attribution) add it to the result.
    ``resume``: continue the fit in ``run_dir`` from its ``checkpoints/last.ckpt`` (see
    :func:`resume`).
    """
    from wsi_lightning.errors import ConfigError

    build.method_kwargs(cfg)  # config errors fail here, before a run folder exists
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    (run_dir / FAILED).unlink(missing_ok=True)  # a resumed or redone run starts afresh
    try:
        return _fit(cfg, run_dir, extra_callbacks, resume)
    except ConfigError:  # bad input, named on the console: nothing ran
        raise
    except Exception as err:  # `wsi runs` reports it as failed (an interrupt leaves it interrupted)
        if not _is_ddp_child() and build.global_rank() == 0 and not (run_dir / "metrics.json").exists():
            _write_json(run_dir / FAILED, {"error": type(err).__name__, "message": str(err)[:2000],
                                           "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        raise


def _fit(cfg: DictConfig, run_dir: Path, extra_callbacks: list[L.Callback] | None, resume: bool) -> RunResult:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.exists() else None
    if resume:
        if (run_dir / "metrics.json").exists():
            raise WSIError(f"--resume {run_dir}: that run finished (metrics.json exists); "
                           f"use wsi test {run_dir} to test it again")
        log.info("resuming %s from %s", run_dir, ckpt_path or "the start (no epoch had finished)")
        if ckpt_path:
            build.trim_metrics_csv(run_dir, int(torch.load(ckpt_path, map_location="cpu", mmap=True,
                                                            weights_only=True)["epoch"]))
    cls, kwargs = build.method_kwargs(cfg)  # config errors fail here, before any data work
    if issubclass(cls, SlideEstimator):  # two-step scikit-learn baselines
        return _fit_estimator(cfg, cls(seed=int(cfg.seed), **kwargs), run_dir)
    build.build_callbacks(cfg, run_dir)
    if cfg.data.is_demo:
        log.info("no data.manifest configured: running on the built-in synthetic demo data "
                 "(%s); the experiment's demo: overrides are applied", build.demo_dir(cfg))
    dm = build.build_datamodule(cfg)
    threads = torch.get_num_threads()
    if cfg.trainer.num_threads:  # the extraction of missing features too
        torch.set_num_threads(int(cfg.trainer.num_threads))
    previous = os.environ.get(RUN_DIR_ENV)
    trainer = None
    try:
        dm.prepare_data()  # before any DDP child exists: children then find the store complete
        # again: extraction draws from the global generators (its DataLoader's base seed), so
        # without this a run's initial weights would depend on whether its features were cached
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm.setup("fit")
        model = build.build_method(cfg, dm.in_dim, dm.num_classes, dm.class_names, str(run_dir),
                                   train_labels=dm.train_labels())
        if build.global_rank() == 0:
            save_resolved(cfg, run_dir)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        # a resumed fit skips the sanity check: the uninterrupted run did it once, at its start
        trainer = build.build_trainer(cfg, run_dir, **({"num_sanity_val_steps": 0} if ckpt_path else {}))
        trainer.callbacks.extend(extra_callbacks or [])
        log.info("run folder: %s", run_dir)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=dm, ckpt_path=ckpt or None, verbose=False, weights_only=True)
    finally:
        if trainer is not None:
            _finish_wandb(trainer)
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    result = RunResult(run_dir, {**_metrics(trainer, "test/"), **_callback_metrics(trainer), **_left_out(dm)},
                       ckpt or None)
    if trainer.is_global_zero:
        _write_metrics(result, cfg)
    return result


def _fit_estimator(cfg: DictConfig, estimator: SlideEstimator, run_dir: Path) -> RunResult:
    """A ``SlideEstimator`` row (``wsi fit patch_lr``): build the data, fit, predict val / test,
    and write ``config.resolved.yaml`` and ``metrics.json`` as a Lightning fit does."""
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    save_resolved(cfg, run_dir)
    metrics = estimator.evaluate(dm, run_dir)
    result = RunResult(run_dir, {k: v for k, v in metrics.items() if k.startswith("test/")}, None)
    _write_metrics(result, cfg)
    return result


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close the run's W&B run, so that the next fit in this process (``wsi reproduce``, local
    sweeps) starts its own instead of logging into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary file + ``os.replace``): a reader, e.g. ``reproduce``
    deciding whether a run finished, sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _write_metrics(result: RunResult, cfg: DictConfig) -> None:
    payload = {"experiment": str(cfg.name), "demo_data": bool(cfg.data.is_demo),
               "best_checkpoint": result.best_checkpoint, "metrics": result.metrics}
    _write_json(result.run_dir / "metrics.json", payload)
    report_metrics(result)


def report_metrics(result: RunResult) -> None:
    """Print the test metrics as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test metrics - {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(result.metrics):
        table.add_row(k, f"{result.metrics[k]:.4f}")
    Console().print(table)


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """``best`` / ``last`` in ``<run_dir>/checkpoints``, or a path to a ``.ckpt`` file."""
    path = run_dir / "checkpoints" / f"{ckpt}.ckpt" if ckpt in ("best", "last") else Path(ckpt).expanduser()
    if not path.is_file():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise WSIError(f"no checkpoint {path}; --ckpt takes best, last or a .ckpt file "
                       f"({run_dir / 'checkpoints'} has {have})")
    return path


def restore_datamodule(dm: Any, ckpt_path: Path) -> None:
    """Give ``dm`` the state its class saved in the checkpoint (``data.standardize``: the
    training slides' feature statistics), so a test or prediction standardises as training did
    rather than refitting on whatever the current manifest calls ``train``."""
    load = getattr(dm, "load_state_dict", None)
    if load is None:
        return
    state = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True).get(type(dm).__qualname__)
    if state:
        load(state)


def test(run_dir: str | Path, ckpt: str = "best", overrides: list[str] | None = None) -> RunResult:
    """Re-test a run from its saved config and a checkpoint (``best``, ``last`` or a path).

    Everything it writes goes to ``<run_dir>/test-<ckpt>/`` (``test_predictions.csv``,
    ``metrics.json``, callback outputs), never over the fit's own files."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.resolved.yaml"
    if not cfg_path.exists():
        raise WSIError(f"{run_dir} is not a run folder (no config.resolved.yaml); pass runs/<exp>/<timestamp>")
    cfg = OmegaConf.load(cfg_path)
    if overrides:
        from wsi_lightning.config import check_keys, parse_overrides

        cli = parse_overrides(overrides)
        check_keys(cfg, cli, "command-line overrides")
        cfg = OmegaConf.merge(cfg, cli)
    ckpt_path = checkpoint_path(run_dir, ckpt)
    out_dir = run_dir / f"test-{ckpt if ckpt in ('best', 'last') else ckpt_path.stem}"
    out_dir.mkdir(exist_ok=True)
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    restore_datamodule(dm, ckpt_path)
    dm.setup("test")
    cls, _ = build.method_kwargs(cfg)
    # weights_only: a checkpoint is read as tensors and plain containers, never as a pickle
    # that could run code (whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", predictions_dir=str(out_dir), weights_only=True)
    trainer = build.build_trainer(cfg, out_dir, logger=False)
    trainer.test(model, datamodule=dm, verbose=False)
    result = RunResult(out_dir, {**_metrics(trainer, "test/"), **_callback_metrics(trainer), **_left_out(dm)},
                       str(ckpt_path))
    if trainer.is_global_zero:
        _write_metrics(result, cfg)
    return result


def attribute(run_dir: str | Path, ckpt: str = "best", options: dict | None = None) -> dict[str, float]:
    """Feature attribution (``FeatureAttribution``) of a finished run, written to
    ``<run_dir>/attribution`` and merged into its ``metrics.json``."""
    import torch

    from wsi_lightning.callbacks.feature_attribution import FeatureAttribution
    from wsi_lightning.callbacks.feature_attribution import attribute as run_attribution

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.resolved.yaml"
    if not cfg_path.exists():
        raise WSIError(f"{run_dir}: {cfg_path.name} missing; pass a finished run folder (runs/<exp>/<timestamp>)")
    ckpt_path = checkpoint_path(run_dir, ckpt)
    cfg = OmegaConf.load(cfg_path)
    opts = FeatureAttribution(**(options or {})).opts  # validates the options
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    restore_datamodule(dm, ckpt_path)
    dm.setup("test")
    cls, _ = build.method_kwargs(cfg)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    with torch.enable_grad():
        metrics = run_attribution(model, dm, run_dir / "attribution", **opts)
    mpath = run_dir / "metrics.json"
    if mpath.exists():
        payload = json.loads(mpath.read_text())
        payload["metrics"].update(metrics)
        _write_json(mpath, payload)
    report_metrics(RunResult(run_dir, metrics, str(ckpt_path)))
    return metrics


# ----------------------------------------------------------------------------- predict
PREDICT_KEYS = ("trainer.devices", "trainer.accelerator", "trainer.strategy", "trainer.num_nodes",
                "trainer.precision", "callbacks", "features.skip_errors")


def predict(run_dir: str | Path, manifest: str | Path, out: str | Path | None = None, ckpt: str = "best",
            overrides: list[str] | None = None, skip_errors: bool = False,
            shard: tuple[int, int] | None = None) -> RunResult:
    """Run a trained run on new slides (``wsi predict RUN_DIR MANIFEST``).

    The manifest needs ``slide_id``, ``case_id`` and ``path``; the label column is optional
    (filled in: metrics are computed over the labelled slides). Slides are tiled and their
    features extracted into the store the model was trained on (slides already there are
    reused), then the checkpoint's model (and its feature statistics) scores them. Writes, into
    ``out`` (default ``<run_dir>/predict-<manifest name>``):

        predictions.csv        slide_id, label, pred, prob_<class>, ..., checkpoint
        attention/             attention.csv and heat-maps (the attention logger; see there)
        config.resolved.yaml   the run's config with this manifest and store
        metrics.json           metrics over the labelled slides (empty without labels)

    Resumable: slides already in ``out/predictions.csv`` from the same checkpoint are skipped
    (and kept), features already in the store are not extracted again. ``skip_errors``: a slide
    that cannot be read is recorded in the store's ``errors.csv`` and left out; the log's last
    line counts them. Overrides may change only how the run executes (threads, workers,
    devices, precision, callbacks), never the model or the data.

    ``shard`` (I, N): predict only shard I of N (see :func:`shard_slides`) into ``out/shardIofN/``,
    a predict folder of its own (resumable as above; extraction failures go to the store's
    ``errors.predict.shardIofN.csv``); the shard that finds all N done merges them into ``out``
    (:func:`merge_shards`), so N jobs of an array can predict one cohort into one folder.
    """
    from wsi_lightning.config import to_dict

    pcfg, cls, ckpt_path, out = _predict_config(run_dir, manifest, out, ckpt, overrides)
    if skip_errors:
        pcfg.features.skip_errors = True
    if not any(c.get("name") == "attention_logger" for c in to_dict(pcfg.callbacks)):
        pcfg.callbacks = [*to_dict(pcfg.callbacks), {"name": "attention_logger"}]
    if shard is None:
        return _predict_slides(pcfg, cls, ckpt_path, out, None, None)
    i, n = shard
    folder = out / f"shard{i}of{n}"
    (folder / SHARD_DONE).unlink(missing_ok=True)  # not done while it runs (again)
    df = _manifest_frame(pcfg, cls, ckpt_path)
    mine = shard_slides(df, str(pcfg.data.bag_level) == "case", i, n)
    log.info("wsi predict: shard %d of %d: %d of the %d slides of %s -> %s", i, n, len(mine), len(df),
             pcfg.data.manifest, folder)
    errors = Path(pcfg.data.store) / f"errors.predict.shard{i}of{n}.csv" if "store" in pcfg.data else None
    result = _predict_slides(pcfg, cls, ckpt_path, folder, mine, errors) if mine else RunResult(folder, {}, None)
    if build.global_rank() == 0:
        save_resolved(pcfg, folder)
        mpath = folder / "metrics.json"  # this pass's, or the earlier pass's when nothing was left to do
        metrics = json.loads(mpath.read_text())["metrics"] if mpath.is_file() else {}
        _write_json(folder / SHARD_DONE, {"shard": i, "of": n, "manifest": str(pcfg.data.manifest),
                                          "checkpoint": str(ckpt_path), "slides": len(mine), "metrics": metrics,
                                          "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        merge_shards(out, n, pcfg, ckpt_path)
    return result


def predict_check(run_dir: str | Path, manifest: str | Path, out: str | Path | None = None,
                  ckpt: str = "best") -> int:
    """``wsi predict RUN_DIR MANIFEST --check``: predict nothing; merge the shard folders of
    ``out`` if all are done (else name the missing ones) and list the manifest's slides that
    ``out/predictions.csv`` lacks, with the extraction error recorded for each. Exit status 1
    when a shard or a slide is missing."""
    import re

    import pandas as pd

    pcfg, cls, ckpt_path, out = _predict_config(run_dir, manifest, out, ckpt, None)
    counts = {int(m.group(2)) for f in out.glob("shard*of*") if (m := re.fullmatch(r"shard(\d+)of(\d+)", f.name))}
    if len(counts) > 1:
        raise WSIError(f"wsi predict --check: {out} has shard folders of {sorted(counts)} shards; remove the "
                       "folders of the earlier split (shard*of<N>) and run the shards of one split")
    merged = not counts or merge_shards(out, counts.pop(), pcfg, ckpt_path)
    ids = list(_manifest_frame(pcfg, cls, ckpt_path)["slide_id"].astype(str))
    done, _ = _previous_predictions(out / "predictions.csv", out / "none", ckpt_path)
    have = _predicted_slides(done) if done is not None else set()
    missing = [s for s in ids if s not in have]
    errors: dict[str, str] = {}
    store = pcfg.data.get("store")
    for f in sorted(Path(store).glob("errors*.csv")) if store else []:
        for _, r in pd.read_csv(f, dtype=str).fillna("").iterrows():
            errors[r["slide_id"]] = f"{r['stage']}: {r['error']} ({f.name})"
    for sid in missing[:10]:
        log.info("  %s: %s", sid, f"failed - {errors[sid]}" if sid in errors else "not predicted yet")
    failed = sum(s in errors for s in missing)
    log.info("%s: %d of %d slides predicted, %d failed, %d not predicted yet%s", out / "predictions.csv",
             len(ids) - len(missing), len(ids), failed, len(missing) - failed, "" if merged else "; shards missing")
    return 1 if missing or not merged else 0


def _predict_config(run_dir: str | Path, manifest: str | Path, out: str | Path | None, ckpt: str,
                    overrides: list[str] | None) -> tuple[DictConfig, type, Path, Path]:
    """The run's config with ``manifest`` (and the run's store), its method class, the
    checkpoint and the output folder; refuses overrides that change the model or the data."""
    from wsi_lightning.config import check_keys, non_execution_keys, parse_overrides

    run_dir, manifest = Path(run_dir), Path(manifest).expanduser().resolve()
    cfg_path = run_dir / "config.resolved.yaml"
    if not cfg_path.exists():
        raise WSIError(f"{run_dir} is not a run folder (no config.resolved.yaml); pass runs/<exp>/<timestamp>")
    if not manifest.is_file():
        raise WSIError(f"wsi predict: manifest {manifest} not found")
    cfg = OmegaConf.load(cfg_path)
    cls, _ = build.method_kwargs(cfg)
    if issubclass(cls, SlideEstimator):
        raise WSIError(f"wsi predict: '{cfg.method.name}' is a two-step scikit-learn baseline that keeps "
                       "no checkpoint; predict with a Lightning method's run")
    ckpt_path = checkpoint_path(run_dir, ckpt).resolve()
    out = Path(out) if out else run_dir / f"predict-{manifest.stem}"
    cli = parse_overrides(overrides)
    refused = [k for k in non_execution_keys(cli) if not any(k == p or k.startswith(f"{p}.") for p in PREDICT_KEYS)]
    if refused:
        raise WSIError(f"wsi predict: override(s) {refused} change the model or the data; predict keeps "
                       "the run's config. Allowed: threads, workers, devices, precision, callbacks")
    check_keys(cfg, cli, "command-line overrides")
    # the store the model was trained on (new slides are added to it) and the demo's folder
    layout = build.datamodule_class(cfg, build.method_input_kind(cfg)).layout
    data: dict[str, Any] = {"manifest": str(manifest), "is_demo": False}
    if layout is not None:
        data["store"] = str(build.store_path(cfg))
    if cfg.data.is_demo:
        data["root"] = str(build.demo_dir(cfg))
    return OmegaConf.merge(cfg, {"data": data}, cli), cls, ckpt_path, out


def _manifest_frame(pcfg: DictConfig, cls: type, ckpt_path: Path) -> Any:
    """The prediction manifest's rows (``slide_id``, ``case_id``, ...), as the DataModule reads them."""
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return build.build_datamodule(pcfg, predict={t: list(c) for t, c in model.class_names.items()}).manifest.df


def shard_slides(df: Any, case_level: bool, i: int, n: int) -> list[str]:
    """The slides of shard ``i`` of ``n``: every n-th slide id (sorted) from the i-th, as
    ``wsi extract --shard`` takes them, or, for patient-level bags (``case_level``), the slides
    of every n-th case: a case is never split between shards. Shards are disjoint and together
    hold every slide."""
    key = "case_id" if case_level else "slide_id"
    units = set(sorted(set(df[key].astype(str)))[i::n])
    return sorted(df.loc[df[key].astype(str).isin(units), "slide_id"].astype(str))


def _predict_slides(pcfg: DictConfig, cls: type, ckpt_path: Path, out: Path, slides: list[str] | None,
                    errors: Path | None) -> RunResult:
    """Predict the manifest's slides (or ``slides`` of it) into ``out``, resuming an earlier
    pass there; extraction failures go to ``errors`` (default the store's ``errors.csv``)."""
    from wsi_lightning.outputs import ATTENTION

    out.mkdir(parents=True, exist_ok=True)
    pred_csv, att_csv = out / "predictions.csv", out / ATTENTION
    done, done_att = _previous_predictions(pred_csv, att_csv, ckpt_path)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", predictions_dir=str(out), weights_only=True)
    classes = {t: list(c) for t, c in model.class_names.items()}
    all_ids = slides if slides is not None else list(build.build_datamodule(pcfg, predict=classes).manifest.df["slide_id"])
    todo = [s for s in all_ids if s not in _predicted_slides(done)] if done is not None else all_ids
    if not todo:
        log.info("wsi predict: all %d slides of %s are already in %s (checkpoint %s)", len(all_ids),
                 pcfg.data.manifest, pred_csv, ckpt_path)
        return RunResult(out, {}, str(ckpt_path))
    if done is not None:
        log.info("wsi predict: %d of %d slides already predicted in %s; predicting the other %d",
                 len(all_ids) - len(todo), len(all_ids), pred_csv, len(todo))
    dm = build.build_datamodule(pcfg, predict=classes, slides=todo, errors=errors)
    save_resolved(pcfg, out)
    threads = torch.get_num_threads()
    if pcfg.trainer.num_threads:
        torch.set_num_threads(int(pcfg.trainer.num_threads))
    try:
        dm.prepare_data()
        restore_datamodule(dm, ckpt_path)
        dm.setup("test")
        trainer = build.build_trainer(pcfg, out, logger=False)
        trainer.test(model, datamodule=dm, verbose=False)
    finally:
        torch.set_num_threads(threads)
    left_out = getattr(dm, "left_out", {}).get("test", [])
    metrics = {**_metrics(trainer, "test/"), **_callback_metrics(trainer)}
    if not any(k.endswith("/auroc") for k in metrics):  # no labelled slide: a loss of nothing
        metrics = {k: v for k, v in metrics.items() if not k.startswith("test/loss")}
    result = RunResult(out, {**metrics, "test/slides_left_out": float(len(left_out))}, str(ckpt_path))
    if trainer.is_global_zero:
        _merge_predictions(out, pred_csv, att_csv, done, done_att, ckpt_path)
        _write_metrics(result, pcfg)
        n = len(todo) - len(left_out)
        if left_out:
            log.warning("wsi predict: %d of %d slides failed and are not in %s (see %s): %s",
                        len(left_out), len(all_ids), pred_csv, errors or Path(pcfg.data.store) / "errors.csv",
                        left_out[:10])
        log.info("wsi predict: %d slides predicted this pass, %d failed; %s holds %d", n, len(left_out),
                 pred_csv, n + (0 if done is None else len(done)))
    return result


def _predicted_slides(done: Any) -> set[str]:
    """The slides of earlier prediction rows (a patient-level row lists its slides in ``slide_ids``)."""
    if "slide_id" in done.columns:
        return set(done["slide_id"].astype(str))
    return {s for cell in done["slide_ids"].astype(str) for s in cell.split(";")}


def _previous_predictions(pred_csv: Path, att_csv: Path, ckpt_path: Path) -> tuple[Any, Any]:
    """The rows of an earlier ``wsi predict`` into the same folder with the same checkpoint
    (kept; their slides are not predicted again), or (None, None)."""
    import pandas as pd

    if not pred_csv.is_file():
        return None, None
    done = pd.read_csv(pred_csv, dtype={"slide_id": str, "case_id": str, "slide_ids": str})
    if set(done.get("checkpoint", pd.Series(dtype=str)).astype(str)) != {str(ckpt_path)}:
        log.warning("wsi predict: %s came from another checkpoint; predicting every slide again", pred_csv)
        return None, None
    att = pd.read_csv(att_csv, dtype={"slide_id": str, "map": str}) if att_csv.is_file() else None
    return done, att


def _merge_predictions(out: Path, pred_csv: Path, att_csv: Path, done: Any, done_att: Any,
                       ckpt_path: Path) -> None:
    """``test_predictions.csv`` of this pass -> ``predictions.csv`` (with the checkpoint and the
    earlier passes' rows), and the earlier passes' attention rows back into ``attention.csv``."""
    import pandas as pd

    new_csv = out / "test_predictions.csv"
    new = pd.read_csv(new_csv, dtype={"slide_id": str}) if new_csv.is_file() else pd.DataFrame()
    new["checkpoint"] = str(ckpt_path)
    rows = new if done is None else pd.concat([done, new], ignore_index=True)
    tmp = pred_csv.with_name(f".{pred_csv.name}.{os.getpid()}.tmp")
    rows.sort_values("slide_id" if "slide_id" in rows.columns else "case_id").to_csv(tmp, index=False)
    os.replace(tmp, pred_csv)
    new_csv.unlink(missing_ok=True)
    if done_att is not None and att_csv.is_file():
        att = pd.concat([done_att, pd.read_csv(att_csv, dtype={"slide_id": str, "map": str})], ignore_index=True)
        tmp = att_csv.with_name(f".{att_csv.name}.{os.getpid()}.tmp")
        att.to_csv(tmp, index=False)
        os.replace(tmp, att_csv)


# ----------------------------------------------------------------------------- predict shards
SHARD_OWN = ("metrics.json", "config.resolved.yaml", SHARD_DONE, "test_predictions.csv")  # not merged as files


def _shard_done(folder: Path, manifest: str, ckpt_path: Path) -> dict | None:
    """A shard folder's ``shard.json`` when it finished this manifest with this checkpoint."""
    try:
        state = json.loads((folder / SHARD_DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if (state.get("manifest"), state.get("checkpoint")) == (manifest, str(ckpt_path)) else None


def merge_shards(out: Path, n: int, pcfg: DictConfig, ckpt_path: Path) -> bool:
    """Merge the ``out/shardIofN/`` folders of ``wsi predict --shard I/N`` into ``out`` once all N
    are done (each has its ``shard.json`` for this manifest and checkpoint); False, merging
    nothing, while one is not. Every CSV the shards wrote at one path (``predictions.csv``,
    ``attention/attention.csv``, ``mechanism.csv``: rows per slide or case) is concatenated,
    every other file (heat-maps) linked; ``metrics.json`` is computed from the merged
    predictions (the shards' own metrics beside it). Each file is replaced atomically, so the
    shards finishing last at once both merge, to the same files."""
    folders = [out / f"shard{k}of{n}" for k in range(n)]
    states = [_shard_done(f, str(pcfg.data.manifest), ckpt_path) for f in folders]
    waiting = [k for k, st in enumerate(states) if st is None]
    if waiting:
        log.info("wsi predict: %d of %d shards done; shard(s) %s not yet: the last to finish merges "
                 "them into %s", n - len(waiting), n, waiting, out / "predictions.csv")
        return False
    csvs: dict[Path, list[Path]] = {}
    files: dict[Path, list[Path]] = {}
    for f in folders:
        for path in sorted(f.rglob("*")):
            rel = path.relative_to(f)
            if path.is_file() and not path.name.startswith(".") and str(rel) not in SHARD_OWN:
                (csvs if path.suffix == ".csv" else files).setdefault(rel, []).append(path)
    for rel, paths in csvs.items():
        _concat_csv(paths, out / rel)
    for rel, paths in files.items():
        if len(paths) == 1:  # a slide's own image; one per shard (a confusion matrix) stays there
            _link(paths[0], out / rel)
    _link(folders[0] / "config.resolved.yaml", out / "config.resolved.yaml")
    _write_shard_metrics(out, pcfg, ckpt_path, states)
    log.info("wsi predict: merged %d shards into %s", n, out / "predictions.csv")
    return True


def _concat_csv(paths: list[Path], dest: Path) -> None:
    """The rows of ``paths`` (read as text: values are copied, never re-formatted) into ``dest``,
    sorted by ``slide_id`` / ``case_id`` when that is the first column (``predictions.csv``)."""
    import pandas as pd

    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths]
    rows = pd.concat(frames, ignore_index=True)
    if len(rows.columns) and rows.columns[0] in ("slide_id", "case_id"):
        rows = rows.sort_values(rows.columns[0], kind="stable")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    rows.to_csv(tmp, index=False)
    os.replace(tmp, dest)


def _link(src: Path, dest: Path) -> None:
    """``dest`` becomes ``src`` (a hard link, or a copy across file systems), atomically."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def _write_shard_metrics(out: Path, pcfg: DictConfig, ckpt_path: Path, states: list[dict]) -> None:
    """``metrics.json`` of the merged folder: the metrics of its labelled rows (as the test of one
    pass computes them, without the loss) and every shard's own."""
    import pandas as pd

    from wsi_lightning.analysis.metrics import TaskMetrics
    from wsi_lightning.outputs import classes_from_columns

    preds = out / "predictions.csv"
    df = pd.read_csv(preds, dtype=str, keep_default_na=False) if preds.is_file() else pd.DataFrame()
    targets = list(pcfg.data.tag_cols) if pcfg.data.task == "multitag" else [str(pcfg.data.label_col)]
    metrics: dict[str, float] = {}
    if len(df):
        classes = classes_from_columns(df, targets)
        tm = TaskMetrics({t: len(c) for t, c in classes.items()})
        pre = {t: "" if len(targets) == 1 else f"{t}_" for t in targets}
        probs = {t: torch.tensor(df[[f"{pre[t]}prob_{c}" for c in names]].astype(float).to_numpy(),
                                 dtype=torch.float32) for t, names in classes.items()}  # (B, C)
        labels = {t: torch.tensor([names.index(v) if v in names else -1 for v in df[f"{pre[t]}label"]])
                  for t, names in classes.items()}  # (B,), -1 unknown
        tm.update(probs, labels)
        metrics = {k: float(v) for k, v in tm.compute("test").items()}
    metrics["test/slides_left_out"] = sum(st["metrics"].get("test/slides_left_out", 0.0) for st in states)
    _write_json(out / "metrics.json", {
        "experiment": str(pcfg.name), "demo_data": False, "best_checkpoint": str(ckpt_path), "metrics": metrics,
        "shards": {f"shard{st['shard']}of{st['of']}": st["metrics"] for st in states}})
