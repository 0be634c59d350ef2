"""The only place objects are built from config: name -> registry -> class.

Data-derived sizes (feature size, classes) come from the DataModule and are injected here,
never written in a method's YAML.
"""

from __future__ import annotations

import csv
import inspect
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as CSVExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from wsi_lightning.config import allowed_types, check_value, to_dict
from wsi_lightning.errors import ConfigError
from wsi_lightning.registry import CALLBACKS, METHODS

log = logging.getLogger(__name__)


def import_registered() -> None:
    """Import every module that registers methods and callbacks."""
    import wsi_lightning.callbacks as callbacks
    import wsi_lightning.methods as methods

    methods.import_all()
    callbacks.import_all()


# ----------------------------------------------------------------------------- data
def demo_folder(root: str | Path, task: str = "lesion", n_slides: int | None = None, seed: int = 0) -> Path:
    """``<root>/demo[-<task>][-n<slides>][-seed<seed>]``: each demo set its own folder."""
    name = "demo" if task == "lesion" else f"demo-{task}"
    if n_slides is not None:
        name += f"-n{int(n_slides)}"
    if int(seed or 0) != 0:
        name += f"-seed{int(seed)}"
    return Path(root) / name


def demo_dir(cfg: DictConfig) -> Path:
    demo = cfg.data.demo
    return demo_folder(cfg.data.root, demo.get("task", "lesion"), demo.get("n_slides"), demo.get("seed") or 0)


def manifest_path(cfg: DictConfig) -> Path:
    """The manifest of the run; in demo mode the demo set is generated first if missing."""
    if not cfg.data.is_demo:
        return Path(cfg.data.manifest)
    from wsi_lightning.demo import make_demo_dataset

    d = dict(to_dict(cfg.data.demo))
    n = d.pop("n_slides")
    return make_demo_dataset(demo_dir(cfg), n_slides=None if n is None else int(n), seed=int(d.pop("seed")), **d)


def store_path(cfg: DictConfig) -> Path:
    """``data.store``, or a folder named after the tiling and backbone so that settings never mix."""
    if cfg.data.store:
        return Path(cfg.data.store)
    from wsi_lightning.features.layouts import layout_for

    t, f = cfg.tiling, cfg.features
    key = f"{Path(str(f.backbone)).name}_{t.tile_size}px_{t.mpp}mpp" + layout_for(to_dict(t)).store_suffix()
    base = demo_dir(cfg) if cfg.data.is_demo else Path(cfg.data.root)
    return base / "features" / key


def import_datamodules() -> None:
    """Import every module that registers a DataModule."""
    import wsi_lightning.data.bags
    import wsi_lightning.data.multiscale
    import wsi_lightning.data.quadtree
    import wsi_lightning.data.sampling  # noqa: F401


def method_input_kind(cfg: DictConfig) -> str:
    """The ``input_kind`` (bag, multiscale, quadtree, slides, ...) of the configured method."""
    import_registered()
    return METHODS.get(str(cfg.method.name)).input_kind


def datamodule_class(cfg: DictConfig, input_kind: str) -> type:
    """The DataModule serving ``input_kind`` from this config's store layout, its config
    checked (``data.bag_level`` included: only plain feature bags come as patient-level bags)."""
    from wsi_lightning.data.bags import datamodule_for

    import_datamodules()
    cls = datamodule_for(input_kind, str(cfg.tiling.multiscale.mode))
    cls.check_bag_level(cfg)
    cls.check_config(cfg, input_kind)
    return cls


def build_datamodule(cfg: DictConfig, predict: dict[str, list[str]] | None = None,
                     slides: list[str] | None = None, errors: Path | None = None) -> Any:
    """The registered DataModule for the method's ``input_kind`` and the store layout, built
    from the config (``from_config``); store-based ones get the extraction of what is missing
    as their ``prepare_data``, its failures recorded in ``errors`` (default the store's
    ``errors.csv``; a shard of ``wsi predict --shard`` has its own).

    ``predict``: the trained model's ``{target: class names}``; the manifest's slides are then
    slides to predict (labels optional, every slide in ``test``: ``wsi predict``), restricted
    to ``slides`` when given."""
    from wsi_lightning.features.extract import ErrorReport, expected_provenance
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.manifest import check_slide_files, load_manifest

    targets = list(cfg.data.tag_cols) if cfg.data.task == "multitag" else [cfg.data.label_col]
    classes = to_dict(cfg.data.classes)
    if predict is None:
        manifest = load_manifest(manifest_path(cfg), targets, classes, check_files=False)
    else:
        manifest = load_manifest(manifest_path(cfg), targets, predict, check_files=False, allow_missing=True,
                                 require_labels=False)
        if slides is not None:
            manifest.df = manifest.df[manifest.df["slide_id"].isin(set(slides))].reset_index(drop=True)
        manifest.df["split"] = "test"
    if cfg.data.task == "binary" and any(len(c) != 2 for c in manifest.classes.values()):
        raise ConfigError(f"data.task=binary but {manifest.source} has classes {manifest.classes}; "
                          "set data.task=multiclass")
    kind = method_input_kind(cfg)
    cls = datamodule_class(cfg, kind)
    if cls.layout is None:  # slides read on the fly: no tiling, no feature store
        check_slide_files(manifest, step="on-the-fly slide sampling")
        if "roi" in manifest.df.columns and (manifest.df["roi"] != "").any():
            log.warning("manifest %s: its roi column restricts tiling only; %s reads slides on the fly "
                        "and samples all of their tissue", manifest.source, cls.__name__)
        return cls.from_config(cfg, manifest, kind, demo_dir(cfg) if cfg.data.is_demo else Path(cfg.data.root))
    store = store_path(cfg)
    # a store made with another backbone / weights / tiling is refused, not silently reused
    FeatureStore(store).check_provenance(expected_provenance(to_dict(cfg.tiling), to_dict(cfg.features)),
                                         accept_mismatch=bool(cfg.features.accept_store_mismatch))
    if not cfg.features.skip_errors:
        check_slide_files(manifest, skip=set(FeatureStore(store).complete_slides()))
    feats = dict(to_dict(cfg.features))
    if feats.get("devices") not in (1, "1"):
        # a multi-process predict launched from inside `wsi fit` would re-run the whole fit in
        # each child; multi-device extraction is its own command.
        log.warning("features.devices=%s is used by `wsi extract` only; inside `wsi fit` missing "
                    "features are extracted on one device (run `wsi extract MANIFEST "
                    "features.devices=N` first to use several)", feats["devices"])
        feats["devices"] = 1
    prepare = partial(extract_missing, manifest, FeatureStore(store), to_dict(cfg.tiling),
                      feats, bool(cfg.features.skip_errors), report=ErrorReport(errors) if errors else None)
    return cls.from_config(cfg, manifest, store, prepare)


# ----------------------------------------------------------------------------- multi-process launches
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
               "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NAME", "SLURM_NODEID")


def prepare_shared_data(cfgs: list[DictConfig]) -> None:
    """Make each feature store (and the demo slides) the configs read, once, before parallel
    fits start (``wsi reproduce --jobs``, ``wsi sweep --workers``): two fits extracting into one
    store at once would each do all the work."""
    seen: set[str] = set()
    for cfg in cfgs:
        kind = method_input_kind(cfg)
        if datamodule_class(cfg, kind).layout is None:
            manifest_path(cfg)  # the demo slides, generated if missing
            continue
        key = str(store_path(cfg))
        if key not in seen:
            seen.add(key)
            build_datamodule(cfg).prepare_data()


def launched() -> tuple[int, int, int] | None:
    """(global rank, world size, local rank) of a process that torchrun (any ``--nnodes``) or
    SLURM's ``srun`` (several tasks) started as one of several; None for a plain process
    (Lightning's own DDP launcher starts its children later, from a plain process)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env \
            and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # Lightning's rule
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def launch_group() -> Any:
    """Under torchrun / SLURM (:func:`launched`), the default process group, set up once here
    with the backend Lightning would choose (NCCL on GPUs, Gloo on CPUs) so that the processes
    can agree on a run folder and share extraction before the Trainer exists; Lightning then
    trains in this group. None for a plain process."""
    import torch
    import torch.distributed as dist

    where = launched()
    if where is None or not dist.is_available():
        return None
    if dist.is_initialized():
        return dist.group.WORLD
    rank, world, local = where
    if "MASTER_ADDR" not in os.environ:  # srun: Lightning's SLURM environment knows the main node
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = slurm.main_address, str(slurm.main_port)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    from datetime import timedelta

    # extraction of a large cohort happens between two collectives: a generous timeout
    hours = float(os.environ.get("WSI_DIST_TIMEOUT_HOURS", "12"))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(hours=hours))
    log.info("process %d of %d (local %d): process group up (%s)", rank, world, local, dist.get_backend())
    return dist.group.WORLD


def global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


class single_process_env:  # noqa: N801  (a context manager, used as a statement)
    """Hide the launcher's variables, so that a Trainer made inside (feature extraction on this
    process's own device) runs as a plain single-device process."""

    def __enter__(self) -> None:
        self.saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}

    def __exit__(self, *exc: object) -> None:
        os.environ.update(self.saved)


def extract_missing(manifest: Any, store: Any, tiling: dict, features: dict, skip_errors: bool = False,
                    report: Any = None) -> list[str]:
    """``extract_features`` of what the store lacks; under torchrun / SLURM every process takes
    every W-th slide (whole slides per global rank, one shared store: its writes are atomic and
    host-aware), on its own device, then all wait for all."""
    import dataclasses

    import torch.distributed as dist

    from wsi_lightning.features.extract import ErrorReport, extract_features

    where = launched()
    if where is None:
        return extract_features(manifest, store, tiling, features, skip_errors, report=report)
    launch_group()
    rank, world, local = where
    ids = sorted(manifest.df["slide_id"])[rank::world]
    mine = dataclasses.replace(manifest, df=manifest.df[manifest.df["slide_id"].isin(set(ids))].reset_index(drop=True))
    feats = dict(features, devices=[local] if _on_gpu(features) else 1)
    report = report if report is not None else ErrorReport(store.root / f"errors.rank{rank}of{world}.csv")
    todo = sum(not store.is_complete(s) for s in ids)
    if todo:
        log.info("process %d of %d: %d of its %d slides (of %d) to extract", rank, world, todo, len(ids),
                 len(manifest.df))
    try:
        with single_process_env():
            done = extract_features(mine, store, tiling, feats, skip_errors, report=report)
    finally:
        dist.barrier()  # every slide is in the store before any process reads it
    return done


def _on_gpu(features: dict) -> bool:
    import torch

    return str(features.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


# ----------------------------------------------------------------------------- method
def method_kwargs(cfg: DictConfig) -> tuple[type, dict[str, Any]]:
    """The registered method class and its checked arguments from ``method:``."""
    from wsi_lightning.methods.base import module_arguments, net_arguments

    import_registered()
    m = dict(to_dict(cfg.method))
    name = m.pop("name")
    from wsi_lightning.methods.base import SlideEstimator

    cls = METHODS.get(name)
    if issubclass(cls, SlideEstimator):  # not a LightningModule: run.fit dispatches on the class
        valid = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                 if k not in ("self", "seed")}
    else:
        valid = {**net_arguments(cls.Net), **module_arguments(cls)}
    unknown = sorted(set(m) - set(valid))
    if unknown:
        raise ConfigError(f"unknown config key(s) {['method.' + k for k in unknown]} for method "
                          f"'{name}'; valid keys: {sorted(valid)}")
    missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in m]
    if missing:
        raise ConfigError(f"method '{name}' needs config key(s) {['method.' + k for k in missing]}")
    datamodule_class(cfg, cls.input_kind)  # the data config serves this method's input (config time)
    weights = cfg.loss.get("class_weights")
    if weights is not None and not getattr(cls, "class_weighted", False):
        raise ConfigError(f"loss.class_weights={to_dict(weights)!r}: method '{name}' computes losses of its "
                          "own that the weights would not reach (supported by the methods whose class "
                          "sets class_weighted = True); set loss.class_weights=null")
    params = dict(inspect.signature(cls.__init__).parameters) if issubclass(cls, SlideEstimator) else _signature_params(cls)
    for k, v in m.items():
        check_value(f"method.{k}", v, _param_types(params.get(k), valid[k]))
    return cls, m


_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
    "list": (list,), "tuple": (list,), "Sequence": (list,), "dict": (dict,), "Mapping": (dict,), "Literal": (str,),
}


def _signature_params(cls: type) -> dict[str, inspect.Parameter]:
    """The ``inspect.Parameter`` of every configurable argument of a method (net + module)."""
    from wsi_lightning.methods.base import MILModule

    out = dict(inspect.signature(cls.Net.__init__).parameters)
    for klass in cls.__mro__:
        if klass is MILModule or not issubclass(klass, MILModule):
            break
        for n, prm in inspect.signature(klass.__init__).parameters.items():
            out.setdefault(n, prm)
    return out


def _param_types(param: inspect.Parameter | None, default: Any) -> tuple[type, ...] | None:
    """The types a method argument accepts, from its annotation (``int | None``,
    ``Sequence[int]``, ``Literal[...]``...), else from its default; None: unchecked."""
    import re

    ann = param.annotation if param is not None else inspect.Parameter.empty
    if isinstance(ann, str) and ann:
        names = [re.split(r"\[", part.strip())[0].split(".")[-1] for part in _top_level_union(ann)]
        if all(n in _ANNOTATION_TYPES for n in names):
            return tuple(t for n in names for t in _ANNOTATION_TYPES[n])
        return None  # Any, a class, a callable...: not checked here
    if isinstance(default, tuple):
        return (list,)
    return None if default is inspect.Parameter.empty else allowed_types(default)


def _top_level_union(ann: str) -> list[str]:
    """``"int | Sequence[int | str] | None"`` -> ``["int", "Sequence[int | str]", "None"]``."""
    parts, depth, cur = [], 0, ""
    for ch in ann:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def build_method(cfg: DictConfig, in_dim: int, num_classes: dict[str, int],
                 class_names: dict[str, list[str]] | None = None,
                 predictions_dir: str | None = None,
                 train_labels: dict[str, np.ndarray] | None = None) -> L.LightningModule:
    """The configured method; ``train_labels`` ({target: (S,) class indices of the training
    slides}, -1 unknown) are what ``loss.class_weights=balanced`` is computed from."""
    cls, kwargs = method_kwargs(cfg)
    weights = class_weights(cfg.loss.get("class_weights"), num_classes, train_labels)
    if weights is not None:
        kwargs["class_weights"] = weights
    return cls(in_dim=in_dim, num_classes=num_classes, class_names=class_names,
               optim=to_dict(cfg.optim), tag_weights=to_dict(cfg.loss.tag_weights),
               max_epochs=int(cfg.trainer.max_epochs), predictions_dir=predictions_dir, **kwargs)


def class_weights(spec: Any, num_classes: dict[str, int],
                  train_labels: dict[str, np.ndarray] | None) -> dict[str, list[float]] | None:
    """``loss.class_weights`` as {target: [C weights]}: None, ``balanced`` (scikit-learn's rule,
    n / (C * n_c) over the labelled training slides; a class without any gets 1) or explicit
    lists, checked against the targets and their class counts."""
    if spec is None:
        return None
    spec = to_dict(spec) if isinstance(spec, DictConfig) else spec
    if spec == "balanced":
        if train_labels is None:
            raise ConfigError("loss.class_weights=balanced needs the training slides' labels")
        out = {}
        for t, c in num_classes.items():
            y = np.asarray(train_labels[t])
            y = y[y >= 0]
            counts = np.bincount(y, minlength=c).astype(float)
            w = np.where(counts > 0, len(y) / (c * np.maximum(counts, 1)), 1.0)
            out[t] = [round(float(v), 6) for v in w]
        return out
    if not isinstance(spec, dict):
        raise ConfigError(f"loss.class_weights={spec!r}; expected null, balanced or {{target: [weights]}}")
    unknown = sorted(set(spec) - set(num_classes))
    if unknown:
        raise ConfigError(f"loss.class_weights: unknown target(s) {unknown}; targets: {list(num_classes)}")
    out = {}
    for t, w in spec.items():
        if (not isinstance(w, list) or len(w) != num_classes[t]
                or not all(isinstance(v, int | float) and v >= 0 for v in w)):
            raise ConfigError(f"loss.class_weights.{t}={w!r}; expected {num_classes[t]} weights >= 0, "
                              "one per class in data.classes order")
        out[t] = [float(v) for v in w]
    return out


# ----------------------------------------------------------------------------- trainer
def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from wsi_lightning.callbacks.resume import RNGState

    import_registered()
    mon = cfg.monitor
    cbs: list[L.Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=mon.metric,
                        mode=mon.mode, auto_insert_metric_name=False),
        # last.ckpt: every epoch, whether or not the monitor improved (the resume point; with
        # save_last=True on the monitored checkpoint it was refreshed only on improvements).
        # It comes after best: the state it saves knows this epoch's best.
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                        every_n_epochs=1, enable_version_counter=False, auto_insert_metric_name=False),
        RNGState(),
    ]
    if mon.patience:
        cbs.append(EarlyStopping(monitor=mon.metric, mode=mon.mode, patience=int(mon.patience)))
    for i, entry in enumerate(to_dict(cfg.callbacks)):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"callbacks[{i}] must be a mapping with a 'name'; got {entry!r}")
        kw = dict(entry)
        cls = CALLBACKS.get(kw.pop("name"))
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in kw if k not in params)
        if unknown:
            valid = sorted(k for k in params if k != "self")
            raise ConfigError(f"unknown key(s) {unknown} for callbacks[{i}] ({entry['name']}); valid keys: {valid}")
        for k, v in kw.items():
            check_value(f"callbacks[{i}].{k} ({entry['name']})", v, _param_types(params[k], params[k].default))
        cbs.append(cls(**kw))
    return cbs


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    loggers: list[Any] = []
    if cfg.logger.csv:
        loggers.append(_AppendingCSVLogger(save_dir=str(run_dir), name="", version="logs"))
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        online = w.mode == "online"
        loggers.append(WandbLogger(project=w.project, entity=w.entity, name=f"{cfg.name}/{run_dir.name}",
                                   save_dir=str(run_dir), offline=not online,
                                   tags=list(w.tags), config=to_dict(cfg), id=wandb_run_id(run_dir),
                                   resume="allow", group=w.get("group"), job_type=w.get("job_type"),
                                   # W&B artifacts need a server: offline runs keep checkpoints on disk
                                   log_model=bool(w.get("log_checkpoints", False)) and online))
    return loggers


class _AppendingWriter(CSVExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # keep it; new rows go under its header
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class _AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that it appends to an existing ``logs/metrics.csv`` (a
    resumed fit) where Lightning's deletes it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics_csv(run_dir: Path, last_epoch: int) -> None:
    """Drop the rows a killed fit logged after its last checkpointed epoch (the resumed fit
    logs those epochs again), atomically."""
    import pandas as pd

    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return
    m = pd.read_csv(path)
    if "epoch" in m:
        tmp = path.with_name(".metrics.csv.tmp")
        m[~(m["epoch"] > last_epoch)].to_csv(tmp, index=False)
        tmp.replace(path)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder (``wandb-id.txt``), made on its first fit: a resumed fit
    logs into the same W&B run."""
    path = run_dir / "wandb-id.txt"
    if path.exists():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_trainer(cfg: DictConfig, run_dir: Path, **overrides: Any) -> L.Trainer:
    t = dict(to_dict(cfg.trainer))
    kwargs: dict[str, Any] = dict(
        max_epochs=t["max_epochs"], accelerator=t["accelerator"], devices=t["devices"],
        strategy=t["strategy"], num_nodes=t["num_nodes"], precision=t["precision"],
        accumulate_grad_batches=t["accumulate_grad_batches"], gradient_clip_val=t["gradient_clip_val"],
        log_every_n_steps=t["log_every_n_steps"], deterministic=t["deterministic"],
        enable_progress_bar=t["enable_progress_bar"], default_root_dir=str(run_dir),
        callbacks=build_callbacks(cfg, run_dir),
        use_distributed_sampler=False,  # BagDataModule shards itself (unpadded val/test)
    )
    if "logger" not in overrides:  # (test / predict pass logger=False: no W&B run folder for them)
        kwargs["logger"] = build_loggers(cfg, run_dir) or False
    method = METHODS.get(str(cfg.method.name)) if str(cfg.method.name) in METHODS else None
    if method is not None and getattr(method, "find_unused_parameters", False) and t["strategy"] in ("auto", "ddp"):
        # methods stepping sub-models separately (HAG-MIL's levels) leave parameters out of a
        # backward; DDP must look for them (only matters with several devices)
        kwargs["strategy"] = "ddp_find_unused_parameters_true" if _multi_device(t) else t["strategy"]
    if method is not None and issubclass(method, L.LightningModule) and method.automatic_optimization is False \
            and t["accumulate_grad_batches"] != 1:
        raise ConfigError(f"{cfg.method.name} optimises manually; trainer.accumulate_grad_batches must be 1")
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _multi_device(t: dict[str, Any]) -> bool:
    devices, nodes = t["devices"], int(t["num_nodes"])
    many = devices == -1 or (isinstance(devices, int) and devices > 1) or (
        isinstance(devices, (list, str)) and len(str(devices).split(",")) > 1)
    return many or nodes > 1
