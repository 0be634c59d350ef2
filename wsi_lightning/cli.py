"""``wsi`` command line. Heavy modules (torch, lightning, openslide) are imported lazily inside
each command so that ``wsi --help`` answers at once.

    wsi demo-data [--out DIR] [--n-slides N] [--seed S] [--task lesion|multiscale|multitag|zoom]
    wsi info SLIDE [--mpp MPP]
    wsi tile MANIFEST [--out DIR] [key=value ...] [--skip-errors]
    wsi extract MANIFEST [--store DIR] [key=value ...] [--skip-errors] [--shard I/N] [--check]
    wsi import-features FILES_OR_RESULTS_DIR... --store DIR [--format auto|clam_h5|trident_h5|clam_pt] [--coords-dir DIR]
    wsi export-features --store DIR --out DIR [--format clam|trident] [--encoder NAME] [--slides a,b]
    wsi fit EXP [key=value ...] [--resume RUN_DIR]
    wsi test RUN_DIR [--ckpt best|last|PATH]
    wsi predict RUN_DIR MANIFEST [--out DIR] [--ckpt best|last|PATH] [--skip-errors] [--shard I/N] [--check] [key=value ...]
    wsi attribute RUN_DIR [option=value ...]
    wsi runs [DIR] [--csv FILE]
    wsi export-qupath FOLDER [--out DIR] [--map NAME]
    wsi view FOLDER [--out DIR] [--slides a,b] [--max-slides N] [--top-k K]
    wsi manifest camelyon16 ROOT [--out FILE]
    wsi reproduce [TABLE] [--data demo|camelyon16] [--seeds 0,1,2] [--jobs N] [--launcher local|slurm|submitit-local] [--slurm-* ...]
    wsi sweep NAME [--count N] [--offline|--online] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("wsi_lightning")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _setup_logging(verbose: bool, uses_lightning: bool) -> None:
    import warnings

    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=False)
    handler.addFilter(_DropAdverts())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[handler])
    if not uses_lightning:
        return
    # Lightning installs its own console handlers; route its records through ours instead.
    import lightning.pytorch  # noqa: F401  (creates the loggers and their handlers)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _cfg_for_manifest(args: argparse.Namespace):
    """A config for tile/extract: the base (or --exp) with key=value overrides and the manifest."""
    from wsi_lightning import config

    overrides = [*args.overrides, f"data.manifest={args.manifest}"]
    if getattr(args, "store", None):
        overrides.append(f"data.store={args.store}")
    return config.load(args.exp, overrides, demo=False)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from wsi_lightning.build import demo_folder
    from wsi_lightning.demo import make_demo_dataset

    out = args.out or demo_folder("data", args.task, args.n_slides, args.seed)
    path = make_demo_dataset(Path(out), n_slides=args.n_slides, seed=args.seed, workers=args.workers, task=args.task)
    log.info("demo manifest: %s", path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from wsi_lightning.slides import SlideReader

    with SlideReader(args.slide, mpp=args.mpp) as r:
        t = Table(title=str(args.slide))
        t.add_column("level")
        t.add_column("size (w x h)")
        t.add_column("downsample")
        t.add_column("mpp")
        for lv in range(r.level_count):
            w, h = r.level_dimensions[lv]
            t.add_row(str(lv), f"{w} x {h}", f"{r.level_downsamples[lv]:.3f}", f"{r.level_mpp(lv):.4f}")
        con = Console()
        con.print(f"vendor: {r.vendor}  objective: {r.objective_power}  backend: {r.backend}  mpp: {r.mpp}")
        con.print(t)
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    """The backbone presets: output dim, input, licence, gated or not, model card."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from wsi_lightning.features.backbones import build_backbone
    from wsi_lightning.features.foundation import FOUNDATION_MODELS, NOT_PRESETS
    from wsi_lightning.registry import BACKBONES

    t = Table(title="features.backbone presets")
    for col in ("name", "dim", "input", "licence", "gated", "model card / notes"):
        t.add_column(col)
    for name in BACKBONES.names():
        spec = FOUNDATION_MODELS.get(name)
        if spec is not None:
            t.add_row(name, str(spec.dim), f"{spec.input_px} px @ {spec.mpp:g} µm/px", spec.licence,
                      "yes" if spec.gated else "no", f"{spec.card}\n{spec.note}")
            continue
        with torch.device("meta"):  # the dim without allocating or downloading weights
            dim = build_backbone(name, pretrained=False).dim
        doc = (BACKBONES.get(name).__doc__ or "").strip().splitlines()[0]
        t.add_row(name, str(dim), "any", "timm / torchvision weights" if "resnet" in name else "-", "no", doc)
    con = Console()
    con.print(t)
    for name, why in NOT_PRESETS.items():
        con.print(f"[bold]{name}[/bold] (not a preset): {why}")
    con.print("Any other timm name, hf-hub:ORG/NAME or local-dir:DIR works too, with "
              "features.backbone_args for its create_model arguments. Gated models: "
              "`huggingface-cli login` after accepting the terms on the model page.")
    return 0


def cmd_tile(args: argparse.Namespace) -> int:
    from wsi_lightning.config import to_dict
    from wsi_lightning.features.extract import plan_manifest
    from wsi_lightning.manifest import load_manifest

    cfg = _cfg_for_manifest(args)
    # --skip-errors: a missing slide file is recorded and skipped like any other failing slide
    m = load_manifest(args.manifest, cfg.data.label_col if cfg.data.task != "multitag" else list(cfg.data.tag_cols),
                      check_files=not args.skip_errors)
    out = Path(args.out) if args.out else Path(cfg.data.root) / "tiles"
    plans, report = plan_manifest(m, to_dict(cfg.tiling), out, skip_errors=args.skip_errors)
    n = sum(len(p.coords) for p in plans)
    log.info("tiled %d slides, %d tiles -> %s (tissue masks in %s)", len(plans), n, out, out / "qc")
    if report.rows:
        log.warning("%d slide(s) failed; see %s", len(report.rows), report.path)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from wsi_lightning import build
    from wsi_lightning.config import to_dict
    from wsi_lightning.features.extract import ErrorReport, extract_features
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.manifest import load_manifest

    cfg = _cfg_for_manifest(args)
    m = load_manifest(args.manifest, cfg.data.label_col if cfg.data.task != "multitag" else list(cfg.data.tag_cols),
                      check_files=not (args.skip_errors or args.check))
    store = FeatureStore(build.store_path(cfg))
    if args.check:
        return _check_store(m, store)
    name = "errors.csv"
    if args.shard:
        i, n = _parse_shard(args.shard)
        ids = sorted(m.df["slide_id"])[i::n]  # every n-th slide: shards of a job array never overlap
        m.df = m.df[m.df["slide_id"].isin(set(ids))].reset_index(drop=True)
        name = f"errors.shard{i}of{n}.csv"  # one report per shard: shards never overwrite each other's
        log.info("shard %d of %d: %d slides", i, n, len(m.df))
    if build.launched() and not args.shard:  # torchrun / srun: whole slides per global rank, one store
        rank, world, _ = build.launched()
        report = ErrorReport(store.root / f"errors.rank{rank}of{world}.csv")
        done = build.extract_missing(m, store, to_dict(cfg.tiling), to_dict(cfg.features), args.skip_errors,
                                     report=report)
    else:
        report = ErrorReport(store.root / name)
        done = extract_features(m, store, to_dict(cfg.tiling), to_dict(cfg.features), skip_errors=args.skip_errors,
                                report=report)
    failed = f"; {len(report.rows)} slide(s) failed, listed in {report.path}" if report.rows else "; none failed"
    log.info("extracted %d slide(s) into %s (%d complete in total)%s", len(done), store.root,
             len(store.complete_slides()), failed)
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    from wsi_lightning.errors import ArgumentError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ArgumentError(f"--shard {text!r}; expected I/N with integers, e.g. --shard 0/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise ArgumentError(f"--shard {text}; expected 0 <= I < N (shards are numbered from 0)")
    return i, n


def _check_store(m, store) -> int:
    """``wsi extract --check``: the manifest's slides the store lacks, with their last recorded
    error (from every shard's report); exit 1 when any is missing."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    complete = set(store.complete_slides())
    missing = [s for s in m.df["slide_id"] if s not in complete]
    errors: dict[str, str] = {}
    for f in sorted(store.root.glob("errors*.csv")):
        for _, r in pd.read_csv(f, dtype=str).fillna("").iterrows():
            errors[r["slide_id"]] = f"{r['stage']}: {r['error']} ({f.name})"
    if missing:
        table = Table(title=f"{len(missing)} of {len(m.df)} slides missing from {store.root}")
        table.add_column("slide_id")
        table.add_column("status")
        for sid in missing:
            table.add_row(sid, f"failed - {errors[sid]}" if sid in errors else "not extracted yet")
        Console(width=160).print(table)
    failed = sum(s in errors for s in missing)
    log.info("%s: %d of %d slides complete, %d failed, %d not extracted yet", store.root,
             len(m.df) - len(missing), len(m.df), failed, len(missing) - failed)
    return 1 if missing else 0


def cmd_import(args: argparse.Namespace) -> int:
    from wsi_lightning.features.importers import import_features
    from wsi_lightning.features.store import FeatureStore

    paths = [Path(p) for p in args.files]
    ids = import_features(paths, FeatureStore(args.store), fmt=args.format,
                          coords_dir=Path(args.coords_dir) if args.coords_dir else None, overwrite=args.overwrite)
    log.info("imported %d slide(s) into %s", len(ids), args.store)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from wsi_lightning.errors import StoreError
    from wsi_lightning.features.exporters import export_features
    from wsi_lightning.features.store import FeatureStore

    if not Path(args.store).is_dir():
        raise StoreError(f"feature store {args.store} does not exist; pass the folder `wsi extract` or "
                         "`wsi import-features` wrote (data.store)")
    slides = [s for s in args.slides.split(",") if s] if args.slides else None
    files = export_features(FeatureStore(args.store), Path(args.out), fmt=args.format, slides=slides,
                            encoder=args.encoder, overwrite=args.overwrite)
    log.info("wrote %d %s feature file(s) under %s", len(files), args.format, args.out)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from wsi_lightning import config, run

    if args.resume:
        run.resume(args.resume, args.overrides, exp=args.exp)
        return 0
    cfg = config.load(args.exp, args.overrides)
    run.fit(cfg)
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from wsi_lightning import run

    run.test(args.run_dir, ckpt=args.ckpt, overrides=args.overrides)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from wsi_lightning import run

    if args.check:
        return run.predict_check(args.run_dir, args.manifest, out=args.out, ckpt=args.ckpt)
    run.predict(args.run_dir, args.manifest, out=args.out, ckpt=args.ckpt, overrides=args.overrides,
                skip_errors=args.skip_errors, shard=_parse_shard(args.shard) if args.shard else None)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import os

    from wsi_lightning.run_index import index_runs, print_runs

    df = index_runs(args.dir)
    out = Path(args.csv) if args.csv else Path(args.dir) / "runs.csv"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    print_runs(df, f"{len(df)} runs under {args.dir}")
    counts = df["status"].value_counts().to_dict()
    log.info("%s; written to %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no runs", out)
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from wsi_lightning import run
    from wsi_lightning.config import parse_overrides, to_dict

    run.attribute(args.run_dir, ckpt=args.ckpt, options=to_dict(parse_overrides(args.overrides)))
    return 0


def cmd_export_qupath(args: argparse.Namespace) -> int:
    from wsi_lightning.qupath import export_qupath

    export_qupath(args.folder, out=args.out, map_name=args.map)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from wsi_lightning.viewer import build_viewer

    slides = [s for s in args.slides.split(",") if s] if args.slides else None
    build_viewer(Path(args.folder), out=Path(args.out) if args.out else None, slides=slides,
                 max_slides=args.max_slides, top_k=args.top_k)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from wsi_lightning.data.camelyon16 import build_camelyon16_manifest

    path = build_camelyon16_manifest(Path(args.root), out=Path(args.out) if args.out else None,
                                     keep_duplicates=args.keep_duplicates)
    log.info("manifest written: %s (train with: wsi fit <exp> data.manifest=%s)", path, path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from wsi_lightning import reproduce

    tables = [args.table] if args.table else reproduce.list_tables()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    slurm = {"partition": args.slurm_partition, "account": args.slurm_account, "qos": args.slurm_qos,
             "gpus_per_job": args.slurm_gpus_per_job, "cpus_per_job": args.slurm_cpus_per_job,
             "mem_gb": args.slurm_mem_gb, "time_min": args.slurm_time, "setup": args.slurm_setup,
             "prepare": args.slurm_prepare}
    for t in tables:
        md = reproduce.run_table(t, dataset=args.data, seeds=seeds, results=Path(args.results),
                                 extra_overrides=args.overrides, jobs=args.jobs, launcher=args.launcher,
                                 slurm=slurm)
        log.info("%s", md.read_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from wsi_lightning.sweep import run_sweep

    mode = "offline" if args.offline else "online" if args.online else "auto"
    run_sweep(args.name, count=args.count, mode=mode, overrides=args.overrides, resume=args.resume,
              join=args.join, workers=args.workers)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi", description="wsi_lightning: weakly-supervised WSI learning")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-data", help="generate the synthetic demo slides + manifest")
    s.add_argument("--out", default=None, help="default: data/demo[-<task>][-n<slides>][-seed<seed>] "
                   "(the folder `wsi fit` uses for the same data.demo settings)")
    s.add_argument("--n-slides", type=int, default=None, help="default: the task's (80; multitag 120)")
    s.add_argument("--task", default="lesion", help="lesion (tumour vs normal) | multiscale (needs two "
                   "magnifications) | multitag (stain, species and organ tags) | zoom (candidate regions seen "
                   "at low magnification, the deciding cue inside them at high)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("backbones", help="list the feature-extractor presets (dims, input, licences, gating)")
    s.set_defaults(func=cmd_backbones)

    s = sub.add_parser("info", help="levels, sizes, mpp and vendor of a slide")
    s.add_argument("slide")
    s.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px")
    s.set_defaults(func=cmd_info)

    for name, fn, helptext in (("tile", cmd_tile, "segment tissue and tile every slide of a manifest"),
                               ("extract", cmd_extract, "tile + extract features of every slide into the store")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("manifest")
        s.add_argument("overrides", nargs="*", help="config overrides, e.g. tiling.mpp=0.5 features.backbone=resnet18")
        s.add_argument("--exp", default="abmil", help="experiment whose tiling/features settings to use")
        s.add_argument("--skip-errors", action="store_true", help="record failing slides and go on")
        if name == "tile":
            s.add_argument("--out", default=None, help="tile cache folder (default <data.root>/tiles)")
        else:
            s.add_argument("--store", default=None, help="feature store folder (default from the config)")
            s.add_argument("--shard", default=None, metavar="I/N",
                           help="extract only every N-th slide from the I-th (0-based; for job arrays "
                                "writing into one store)")
            s.add_argument("--check", action="store_true",
                           help="extract nothing: list the slides the store lacks and why; exit 1 if any")
        s.set_defaults(func=fn)

    s = sub.add_parser("import-features", help="import CLAM/TRIDENT .h5 or CLAM .pt bags into a store")
    s.add_argument("files", nargs="+", help="feature files, a folder of them, or a CLAM/TRIDENT results folder")
    s.add_argument("--store", required=True)
    s.add_argument("--format", default="auto", choices=["auto", "clam_h5", "trident_h5", "clam_pt"])
    s.add_argument("--coords-dir", default=None, help="CLAM patches/ folder with <slide>.h5 coords (for .pt bags)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("export-features", help="write a store as CLAM (h5_files/, pt_files/) or TRIDENT (features_<enc>/) files")
    s.add_argument("--store", required=True, help="the feature store folder")
    s.add_argument("--out", required=True, help="output folder (CLAM FEATURES_DIRECTORY / TRIDENT patch folder)")
    s.add_argument("--format", default="clam", choices=["clam", "trident"])
    s.add_argument("--encoder", default=None, help="TRIDENT folder name features_<encoder> (default: the backbone)")
    s.add_argument("--slides", default=None, help="comma-separated slide ids (default: all)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("fit", help="train + test an experiment: wsi fit abmil trainer.max_epochs=5")
    s.add_argument("exp", help="experiment name (experiments/<name>.yaml) or a YAML path")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted fit in its folder from its last finished epoch")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("test", help="test a run folder again; outputs go to RUN_DIR/test-<ckpt>/")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--ckpt", default="best", help="best (default), last, or a .ckpt file")
    s.set_defaults(func=cmd_test)

    s = sub.add_parser("predict", help="run a trained run on new slides (labels optional): predictions.csv + maps")
    s.add_argument("run_dir", help="a finished run folder, runs/<exp>/<timestamp>")
    s.add_argument("manifest", help="CSV with slide_id, case_id, path (label optional)")
    s.add_argument("overrides", nargs="*", help="execution settings only: trainer.num_threads=2, trainer.devices=2, ...")
    s.add_argument("--out", default=None, help="output folder (default RUN_DIR/predict-<manifest name>)")
    s.add_argument("--ckpt", default="best", help="best (default), last, or a .ckpt file")
    s.add_argument("--skip-errors", action="store_true",
                   help="leave out slides that cannot be read (recorded in the store's errors.csv)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="predict only every N-th slide (case, for patient-level bags) from the I-th, into "
                        "OUT/shardIofN/; the last shard to finish merges all N into OUT (for job arrays)")
    s.add_argument("--check", action="store_true",
                   help="predict nothing: merge finished shards, list the slides OUT lacks and why; exit 1 if any")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("runs", help="table of the runs under a folder (status, key metrics), also as CSV")
    s.add_argument("dir", nargs="?", default="runs", help="runs folder (default: runs)")
    s.add_argument("--csv", default=None, help="where to write the CSV (default DIR/runs.csv)")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("reproduce", help="run a paper table spec (experiments/tables/) and write results/")
    s.add_argument("table", nargs="?", default=None, help="table name; omitted: every table")
    s.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    s.add_argument("--data", default="demo", help="dataset listed in the table spec (default: demo)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    s.add_argument("--results", default="results")
    s.add_argument("--jobs", type=int, default=None,
                   help="run up to N rows x seeds at once (locally a CPU-thread share or a GPU each; default 1; "
                        "with --launcher slurm: the job array's limit, default none)")
    s.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"],
                   help="local: this machine's processes (default); slurm: one SLURM job per row x seed "
                        "(a job array, through submitit), waited for; submitit-local: the same jobs as local processes")
    g = s.add_argument_group("SLURM jobs (--launcher slurm; over the table spec's slurm: block)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-gpus-per-job", type=int, default=None, help="0 or 1 (default 0)")
    g.add_argument("--slurm-cpus-per-job", type=int, default=None, help="also each run's trainer.num_threads")
    g.add_argument("--slurm-mem-gb", type=int, default=None)
    g.add_argument("--slurm-time", type=int, default=None, metavar="MIN",
                   help="time limit per job in minutes (default 240; a job that reaches it is requeued and resumes)")
    g.add_argument("--slurm-setup", action="append", default=None, metavar="LINE",
                   help="a shell line each job runs first, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-prepare", default=None, choices=["here", "job"],
                   help="make the table's feature stores here before submitting (default) or in a first job")
    s.set_defaults(func=cmd_reproduce)

    s = sub.add_parser("sweep", help="hyperparameter sweep (experiments/sweeps/), W&B agent or local")
    s.add_argument("name", help="sweep name (experiments/sweeps/<name>.yaml) or a YAML path")
    s.add_argument("overrides", nargs="*", help="config overrides for every trial")
    s.add_argument("--count", type=int, default=None, help="number of trials (default: the file's)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--offline", action="store_true", help="local agent (an Optuna study), no W&B server")
    g.add_argument("--online", action="store_true", help="W&B server sweep + agent")
    s.add_argument("--workers", type=int, default=1,
                   help="offline: N worker processes taking trials from the sweep's study (default 1)")
    r = s.add_mutually_exclusive_group()
    r.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                   help="continue a stopped offline sweep (runs/sweeps/<sweep>/<timestamp>): "
                   "interrupted trials run again, then new ones")
    r.add_argument("--join", metavar="SWEEP_DIR", default=None,
                   help="add workers (this machine) to an offline sweep, running or not")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("manifest", help="build a manifest from a public dataset's folder layout")
    s.add_argument("dataset", choices=["camelyon16"])
    s.add_argument("root", help="dataset folder as distributed (e.g. /data/CAMELYON16)")
    s.add_argument("--out", default=None, help="manifest CSV (default <root>/camelyon16_manifest.csv)")
    s.add_argument("--keep-duplicates", action="store_true", help="keep test_049 / normal_086, flagged")
    s.set_defaults(func=cmd_manifest)

    s = sub.add_parser("attribute", help="feature attribution + heat-maps of a finished run (CHOWDER / attention MIL)")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="FeatureAttribution options, e.g. top_features=7 tile_rule=overlap")
    s.add_argument("--ckpt", default="best", help="best (default), last, or a .ckpt file")
    s.set_defaults(func=cmd_attribute)

    s = sub.add_parser("export-qupath", help="tile maps + slide predictions of a run as QuPath GeoJSON "
                       "(File > Import objects), one file per slide")
    s.add_argument("folder", help="a fit run folder (runs/<exp>/<timestamp>) or a wsi predict output folder")
    s.add_argument("--out", default=None, help="output folder (default FOLDER/qupath)")
    s.add_argument("--map", default=None, help="export one attention map only (a value of attention.csv's "
                   "map column: a head 0..H-1, a HAG-MIL level name, ...)")
    s.set_defaults(func=cmd_export_qupath)
    s = sub.add_parser("view", help="a static browser viewer (slides, heat-maps, lesions, predictions) of a run "
                       "or predict folder; open its index.html from disk")
    s.add_argument("folder", help="runs/<exp>/<timestamp> or a wsi predict output folder")
    s.add_argument("--out", default=None, help="viewer folder (default FOLDER/viewer)")
    s.add_argument("--slides", default=None, help="comma-separated slide ids (default: every predicted slide)")
    s.add_argument("--max-slides", type=int, default=None, help="at most N slides (in id order)")
    s.add_argument("--top-k", type=int, default=10, help="most attended tiles marked per slide (default 10)")
    s.set_defaults(func=cmd_view)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops collecting positionals there)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose, args.command in ("fit", "test", "predict", "extract", "attribute", "reproduce", "sweep"))
    from wsi_lightning.errors import WSIError

    try:
        return int(args.func(args) or 0)
    except WSIError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished slides and epochs are kept: rerun the command to resume "
                  "extraction, wsi fit EXP --resume RUN_DIR to resume training, wsi sweep NAME "
                  "--resume SWEEP_DIR to resume a sweep")
        return 130


if __name__ == "__main__":
    sys.exit(main())
