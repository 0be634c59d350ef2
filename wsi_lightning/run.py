"""Plain functions the CLI and tests call: ``fit(cfg)`` and ``test(run_dir)``."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from wsi_lightning import build
from wsi_lightning.config import save_resolved
from wsi_lightning.errors import WSIError

log = logging.getLogger(__name__)
RUN_DIR_ENV = "WSI_RUN_DIR"


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
    parent's folder."""
    if _is_ddp_child() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
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


def _callback_metrics(trainer: L.Trainer) -> dict[str, float]:
    out: dict[str, float] = {}
    for cb in trainer.callbacks:
        m = getattr(cb, "metrics", None)
        if isinstance(m, dict):
            out.update({k: float(v) for k, v in m.items()})
    return out


def fit(cfg: DictConfig, run_dir: Path | None = None,
        extra_callbacks: list[L.Callback] | None = None) -> RunResult:
    """Prepare data (tile + extract what is missing), train, test the best checkpoint.

    Writes into the run folder: ``config.resolved.yaml``, ``checkpoints/``, ``metrics.csv``
    (CSV logger), ``val_predictions.csv`` / ``test_predictions.csv`` and ``metrics.json``.
    ``extra_callbacks`` are appended to the configured ones (e.g. a sweep's early stopping).
    Callbacks exposing a ``metrics`` dict (e.g. feature attribution) add it to the result.
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    build.method_kwargs(cfg)  # config errors fail here, before any data is generated or extracted
    from wsi_lightning.methods import patch_baselines

    if str(cfg.method.name) in patch_baselines.BASELINES:  # two-step scikit-learn baselines
        return patch_baselines.run_from_config(cfg, run_dir)
    build.build_callbacks(cfg, run_dir)
    if cfg.data.is_demo:
        log.info("no data.manifest configured: running on the built-in synthetic demo data "
                 "(%s); the experiment's demo: overrides are applied", build.demo_dir(cfg))
    dm = build.build_datamodule(cfg)
    dm.prepare_data()  # before any DDP child exists: children then find the store complete
    dm.setup("fit")
    model = build.build_method(cfg, dm.in_dim, dm.num_classes, dm.class_names, str(run_dir))
    save_resolved(cfg, run_dir)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    threads = torch.get_num_threads()
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    trainer = None
    try:
        trainer = build.build_trainer(cfg, run_dir)
        trainer.callbacks.extend(extra_callbacks or [])
        log.info("run folder: %s", run_dir)
        trainer.fit(model, datamodule=dm)
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=dm, ckpt_path=ckpt or None, verbose=False)
    finally:
        if trainer is not None:
            _finish_wandb(trainer)
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    result = RunResult(run_dir, {**_metrics(trainer, "test/"), **_callback_metrics(trainer)}, ckpt or None)
    if trainer.is_global_zero:
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


def test(run_dir: str | Path, ckpt: str = "best", overrides: list[str] | None = None) -> RunResult:
    """Re-test a finished run from its saved config and checkpoint (``best`` or ``last``)."""
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
    ckpt_path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
    if not ckpt_path.exists():
        raise WSIError(f"no checkpoint {ckpt_path}; available: {sorted(p.name for p in (run_dir / 'checkpoints').glob('*.ckpt'))}")
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test")
    cls, _ = build.method_kwargs(cfg)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", predictions_dir=str(run_dir))
    trainer = build.build_trainer(cfg, run_dir, logger=False)
    trainer.test(model, datamodule=dm, verbose=False)
    result = RunResult(run_dir, {**_metrics(trainer, "test/"), **_callback_metrics(trainer)}, str(ckpt_path))
    if trainer.is_global_zero:
        report_metrics(result)
    return result


def attribute(run_dir: str | Path, ckpt: str = "best", options: dict | None = None) -> dict[str, float]:
    """Feature attribution (``FeatureAttribution``) of a finished run, written to
    ``<run_dir>/attribution`` and merged into its ``metrics.json``."""
    import torch

    from wsi_lightning.callbacks.feature_attribution import FeatureAttribution
    from wsi_lightning.callbacks.feature_attribution import attribute as run_attribution

    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.resolved.yaml", run_dir / "checkpoints" / f"{ckpt}.ckpt"
    for p in (cfg_path, ckpt_path):
        if not p.exists():
            raise WSIError(f"{run_dir}: {p.name} missing; pass a finished run folder (runs/<exp>/<timestamp>)")
    cfg = OmegaConf.load(cfg_path)
    opts = FeatureAttribution(**(options or {})).opts  # validates the options
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test")
    cls, _ = build.method_kwargs(cfg)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    with torch.enable_grad():
        metrics = run_attribution(model, dm, run_dir / "attribution", **opts)
    mpath = run_dir / "metrics.json"
    if mpath.exists():
        payload = json.loads(mpath.read_text())
        payload["metrics"].update(metrics)
        _write_json(mpath, payload)
    report_metrics(RunResult(run_dir, metrics, str(ckpt_path)))
    return metrics
