"""Throughput at scale: training epochs over a simulated cohort, feature store vs whole-bag ``.pt``.

The cohort (``bench/cohort.py``: 2,000 slides of ~3,000 1024-d float16 instances by default,
log-normal bag sizes 500..12,000, ~12 GB per format; ``--quick``: 96 slides, ~0.24 GB) is
generated once into the cache folder (or ``--cohort-dir``) with the real ``FeatureStore`` and as
whole-bag ``.pt`` files, and reused.

Both loaders go through the real training path: a ``BagDataModule`` over the cohort (every slide
in ``train``), its training ``DataLoader`` (shuffling ``(index, epoch)`` sampler,
``collate_bags``, persistent workers; ``data.standardize``'s default, true: each bag z-scored as it
is read, the statistics fitted once); the ``.pt`` loader differs only in what the dataset reads
a slide with (``torch.load(weights_only=True)`` of the slide's file instead of
``FeatureStore.read``). For each worker count and each step kind, a fresh DataModule per loader
(loaders alternating), its workers started on one batch, then two passes in the same bag order
(``torch.manual_seed``):

    cold   the loader's files dropped from the page cache first (``os.sync``, then
           ``posix_fadvise(POSIX_FADV_DONTNEED)`` per file, which needs no root), fresh store
           caches: a first epoch (worker start-up reported apart, as ``startup_s``). The store's
           group ``zarr.json`` files, which ``setup()`` has just read, are dropped too: a small
           handicap for the store (``per_bag_ms``: ``store_cold`` vs ``store_cold_chunks``)
    warm   right after: the same bags again (a second epoch). The share of the bags' data bytes
           (store chunk files, ``.pt`` files) in the page cache before each pass is measured
           (``mincore``): ``resident``.

Step kinds, run after each batch:

    data   none: the loader alone (bags/s, instances/s, MB/s of float16 features)
    sim    ``time.sleep(step_ms)`` (default 5 ms): a GPU ABMIL step, the CPU free meanwhile
    model  the registered ``abmil`` method: forward, cross-entropy, backward, Adam, on this
           machine's CPU (1 thread), on the first ``model_steps`` batches of the pass

Data-wait fraction = time in ``iter`` / ``next`` on the loader / the pass's wall time. Ratios:
store bags/s over ``.pt`` bags/s (data passes; target 1.0, as ``bench_bags``) and the share of
the wall time not waiting for data (1 - data-wait) at the simulated GPU step with the most
workers (target 0.9, as ``bench_sampling``). ``per_bag_ms`` splits a bag's cost in one process
(store read, ``.pt`` read, each cold and warm, and ``collate_bags``) on the first 200 slides.

Run: ``python -m bench.bench_cohort [--quick] [--cohort-dir DIR] [--slides N] [--workers 0 2]
[--step-ms 5] [--model-steps 200] [--no-standardize] [--save FILE]`` or ``make bench ARGS="--only cohort"``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import mmap
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.cohort import COHORT, QUICK_COHORT, bag_sizes, cohort_bytes, ensure_cohort, slide_ids
from wsi_lightning.data.bags import BagDataModule, FeatureScaler
from wsi_lightning.data.batch import Bag, collate_bags
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# standardize: data.standardize's default in experiments/_base.yaml (each bag z-scored as it is read)
RUN = {"workers": (0, 2), "step_ms": 5.0, "model_steps": 200, "batch_size": 1, "seed": 0, "split_slides": 200,
       "standardize": True}
QUICK_RUN = {**RUN, "model_steps": 12}
KINDS = ("data", "sim", "model")


class PtBags:
    """Whole-bag ``.pt`` files in the place of a ``FeatureStore`` (``BagDataset`` calls ``read``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float16 features and (N, 2) int64 coords: one ``torch.load`` of the whole bag."""
        bag = torch.load(self.root / f"{slide_id}.pt", weights_only=True)
        return bag["features"].numpy(), bag["coords"].numpy()


# ----------------------------------------------------------------------------- page cache
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


_DATA = (os.path.join("c", "0", "0"), ".pt")  # the files holding a bag's arrays (store chunks, .pt)


def _files(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def drop_cache(paths: list[str]) -> None:
    """Evict the files' pages from the page cache (dirty ones written first)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(paths: list[str]) -> float:
    """Share of the files' bytes in the page cache (``mincore`` of a read-only mapping)."""
    page, cached, total = mmap.PAGESIZE, 0, 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            ok = _libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            _libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            cached += int((np.frombuffer(vec, np.uint8) & 1).sum()) * page
            total += len(vec) * page
        finally:
            os.close(fd)
    return cached / max(total, 1)


def _mem_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- steps and passes
def _steps(step_ms: float, dim: int) -> dict[str, Callable[[Bag], None]]:
    """The step run after each batch, per kind (``model``: the registered ``abmil`` method)."""
    from wsi_lightning.methods import abmil  # noqa: F401  (registers "abmil")
    from wsi_lightning.registry import METHODS

    torch.manual_seed(0)
    module = METHODS.get("abmil")(in_dim=dim, num_classes={"label": 2})
    opt = torch.optim.Adam(module.parameters(), lr=2e-4)

    def model(bag: Bag) -> None:
        loss = torch.stack(list(module.task_loss(module(bag), bag).values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"data": lambda bag: None, "sim": lambda bag: time.sleep(step_ms / 1e3), "model": model}


def _pass(loader, step: Callable[[Bag], None], limit: int, seed: int, dim: int) -> dict:
    """One pass over (at most ``limit`` batches of) the loader: wall time and time waiting for it."""
    from rich.progress import Progress

    waits, steps, n_bags, n_inst = [], [], 0, 0
    torch.manual_seed(seed)  # the sampler's shuffle: the same bags in the same order each pass
    t_start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("pass", total=min(limit, len(loader)))
        it = iter(loader)  # counted as waiting: with workers it resets them and sends the first indices
        wait = time.perf_counter() - t_start
        for _ in range(limit):
            t0 = time.perf_counter()
            bag = next(it, None)
            t1 = time.perf_counter()
            wait += t1 - t0
            if bag is None:
                break
            step(bag)
            waits.append(t1 - t0)
            steps.append(time.perf_counter() - t1)
            n_bags, n_inst = n_bags + len(bag), n_inst + int(bag.mask.sum())
            bar.advance(task)
    wall = time.perf_counter() - t_start
    del it
    return {"bags": n_bags, "instances": n_inst, "wall_s": round(wall, 2),
            "bags_per_s": round(n_bags / wall, 1), "instances_per_s": round(n_inst / wall),
            "mb_per_s": round(n_inst * dim * 2 / wall / 1e6, 1),
            "data_wait_fraction": round(wait / wall, 3),
            "wait_ms_median": round(1e3 * statistics.median(waits), 2),
            "step_ms_median": round(1e3 * statistics.median(steps), 2)}


def _group(manifest: Manifest, root: Path, loader_name: str, workers: int, kind: str,
           step: Callable[[Bag], None], limit: int, run_cfg: dict, dim: int,
           scaler: FeatureScaler | None) -> list[dict]:
    """A fresh DataModule + DataLoader for one loader: start its workers, then a cold and a warm pass."""
    dm = BagDataModule(manifest, root / "store", split={"val": 0.0, "test": 0.0},  # every slide in train
                       batch_size=run_cfg["batch_size"], num_workers=workers, standardize=scaler is not None)
    dm.scaler = scaler  # fitted once in run() (as restored from a checkpoint), not again per DataModule
    dm.setup("fit")
    files = _files(root / "store")
    if loader_name == "pt":
        dm.datasets["train"].store = PtBags(root / "pt_files")
        files = _files(root / "pt_files")
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    next(iter(loader))  # starts the (persistent) workers; its reads are dropped below
    startup = round(time.perf_counter() - t0, 2)
    rows = []
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_cache(files)
        res = resident([f for f in files if f.endswith(_DATA)])
        row = {"loader": loader_name, "workers": workers, "kind": kind, "cache": cache,
               "resident": round(res, 3), "startup_s": startup}
        row.update(_pass(loader, step, limit, run_cfg["seed"], dim))
        log.info("%s", row)
        rows.append(row)
    del loader, dm
    gc.collect()  # shuts the persistent workers down
    drop_cache(files)  # leaves the page cache to the next loader
    return rows


def _split(root: Path, ids: list[str], scaler: FeatureScaler | None) -> dict[str, float]:
    """Mean ms per bag of each part of a read, in this process, bag by bag alternating loaders.

    ``cold``: every file of the bags dropped, a fresh store (metadata parsed, features checked
    finite); ``cold_chunks``: only the two chunk files dropped, the ``zarr.json`` files cached
    (as right after ``setup()``, which reads each slide's group metadata), a fresh store;
    ``warm``: the same store again (its caches kept, as in a second epoch); ``standardize``:
    the ``FeatureScaler`` (float16 -> float32 z-scores; 0 without one); ``collate``:
    ``collate_bags`` of one bag (into the padded float32 batch).
    """
    pt = PtBags(root / "pt_files")
    store_files = [f for sid in ids for f in _files(root / "store" / f"{sid}.zarr")]
    chunks = [f for f in store_files if f.endswith(_DATA)]
    total = dict.fromkeys(("store_cold", "pt_cold", "store_cold_chunks", "store_warm", "pt_warm", "standardize",
                           "collate"), 0.0)

    def timed(key: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        out = fn()
        total[key] += time.perf_counter() - t0
        return out

    for phase, drop in (("cold", store_files + [str(pt.root / f"{s}.pt") for s in ids]), ("cold_chunks", chunks)):
        drop_cache(drop)
        store = FeatureStore(root / "store")
        for sid in ids:
            timed(f"store_{phase}", lambda sid=sid, store=store: store.read(sid))
            if phase == "cold":
                timed("pt_cold", lambda sid=sid: pt.read(sid))
    for sid in ids:
        feats, coords = timed("store_warm", lambda sid=sid: store.read(sid))
        timed("pt_warm", lambda sid=sid: pt.read(sid))
        if scaler is not None:
            feats = timed("standardize", lambda feats=feats: scaler(feats))
        item = {"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords), "slide_id": sid,
                "labels": {"label": 0}}
        timed("collate", lambda item=item: collate_bags([item]))
    return {f"{k}_ms": round(1e3 * v / len(ids), 2) for k, v in total.items()}


# ----------------------------------------------------------------------------- report
def _ratios(rows: list[dict], workers: Sequence[int], step_ms: float) -> dict[str, float]:
    by = {(r["loader"], r["workers"], r["kind"], r["cache"]): r for r in rows}
    out = {}
    for w in workers:
        for cache in ("cold", "warm"):
            s, p = by[("store", w, "data", cache)], by[("pt", w, "data", cache)]
            out[f"store_vs_pt_{cache}_w{w}"] = round(s["bags_per_s"] / p["bags_per_s"], 3)
    for cache in ("cold", "warm"):
        sim = by[("store", max(workers), "sim", cache)]
        out[f"fed_at_{step_ms:g}ms_{cache}_w{max(workers)}"] = round(1 - sim["data_wait_fraction"], 3)
    return out


def _table(rows: list[dict], title: str) -> Table:
    """One row per pass: throughput and the data-wait fraction."""
    table = Table(title=title)
    for col in ("step", "w", "cache", "loader", "cached", "bags/s", "inst/s", "MB/s", "wait",
                "wait ms", "step ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in sorted(rows, key=lambda r: (KINDS.index(r["kind"]), r["workers"], r["cache"] == "warm", r["loader"])):
        table.add_row(r["kind"], str(r["workers"]), r["cache"], r["loader"], f"{r['resident']:.0%}",
                      f"{r['bags_per_s']:.1f}", f"{r['instances_per_s'] / 1e3:.0f}k", f"{r['mb_per_s']:.0f}",
                      f"{r['data_wait_fraction']:.0%}", f"{r['wait_ms_median']:.1f}", f"{r['step_ms_median']:.1f}")
    return table


def run(out_dir: Path, quick: bool = False, cohort_dir: Path | None = None, n_slides: int | None = None,
        workers: Sequence[int] | None = None, step_ms: float | None = None,
        model_steps: int | None = None, standardize: bool | None = None) -> dict:
    """Measure both loaders over the cohort. Returns the benchmark record (module docstring).

    Args:
        out_dir: cache folder; the cohort goes to ``out_dir/cohort_<n_slides>`` (made once).
        quick: the 96-slide cohort and 12 model steps (default: 2,000 slides, 200 steps).
        cohort_dir: the cohort's folder instead (made there once, reused).
        n_slides: cohort size instead of the default (other sizes as the default's).
        workers: DataLoader worker counts (default 0 and 2).
        step_ms: the simulated GPU step (default 5 ms).
        model_steps: batches of each ``model`` pass.
        standardize: z-score the bags as read (default true, as ``data.standardize``).

    The record also holds ``per_bag_ms`` (:func:`_split`, on the first ``split_slides`` slides).
    """
    cfg = dict(QUICK_COHORT if quick else COHORT)
    run_cfg = dict(QUICK_RUN if quick else RUN)
    cfg["n_slides"] = int(n_slides or cfg["n_slides"])
    run_cfg.update({k: v for k, v in {"workers": tuple(workers) if workers else None, "step_ms": step_ms,
                                      "model_steps": model_steps, "standardize": standardize}.items()
                    if v is not None})
    root = Path(cohort_dir) if cohort_dir else Path(out_dir) / f"cohort_{cfg['n_slides']}"
    generation = ensure_cohort(root, cfg)
    load_start = os.getloadavg()[0]  # other work on the machine shares its cores
    torch.set_num_threads(1)  # the model gets one core, the DataLoader workers the rest
    manifest = load_manifest(root / "manifest.csv", check_files=False)
    steps = _steps(run_cfg["step_ms"], cfg["dim"])
    ids = slide_ids(cfg)
    scaler = FeatureScaler.fit(FeatureStore(root / "store"), ids) if run_cfg["standardize"] else None
    rows: list[dict] = []
    for w in run_cfg["workers"]:
        for k, kind in enumerate(KINDS):
            limit = run_cfg["model_steps"] if kind == "model" else cfg["n_slides"]
            for name in ("store", "pt") if k % 2 == 0 else ("pt", "store"):  # alternate who goes first
                rows += _group(manifest, root, name, w, kind, steps[kind], limit, run_cfg, cfg["dim"], scaler)
    split = _split(root, ids[: run_cfg["split_slides"]], scaler)
    drop_cache(_files(root))
    console = Console(width=max(Console().width, 110))  # 11 columns: wider than a pipe's 80
    console.print(_table(rows, f"cohort: {cfg['n_slides']} slides, {cohort_bytes(cfg) / 1e9:.1f} GB per format"))
    log.info("per bag, in one process (ms): %s", split)
    sizes = bag_sizes(cfg)
    return {
        "name": "cohort_throughput",
        "passes": rows,
        "per_bag_ms": split,
        "ratios": _ratios(rows, run_cfg["workers"], run_cfg["step_ms"]),
        "targets": {**{f"store_vs_pt_{c}_w{w}": 1.0 for w in run_cfg["workers"] for c in ("cold", "warm")},
                    **{f"fed_at_{run_cfg['step_ms']:g}ms_{c}_w{max(run_cfg['workers'])}": 0.9
                       for c in ("cold", "warm")}},
        "cohort": {"dir": str(root), "config": cfg, "instances_mean": round(float(sizes.mean()), 1),
                   "instances_median": int(np.median(sizes)), "instances_min": int(sizes.min()),
                   "instances_max": int(sizes.max()), "gb_per_format": round(cohort_bytes(cfg) / 1e9, 2),
                   "generation": generation},
        "config": {**run_cfg, "workers": list(run_cfg["workers"]), "kinds": list(KINDS),
                   "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "mem_available_gb": _mem_available_gb(),
                   "load_avg_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
                   "model": "abmil (embed 256, attn 128, not gated, dropout 0.25), Adam lr 2e-4, CPU"},
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="96 slides, 12 model steps")
    p.add_argument("--cohort-dir", type=Path, default=None, help="the cohort's folder (made once, reused)")
    p.add_argument("--slides", type=int, default=None, help="cohort size (default 2,000; --quick 96)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 0 2)")
    p.add_argument("--step-ms", type=float, default=None, help="simulated GPU step (default 5)")
    p.add_argument("--model-steps", type=int, default=None, help="batches per model pass (default 200)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                   help="bags as stored, not z-scored (data.standardize=false)")
    p.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "cohort",
                   help="cache folder when no --cohort-dir (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.cache, quick=args.quick, cohort_dir=args.cohort_dir, n_slides=args.slides,
                 workers=args.workers, step_ms=args.step_ms, model_steps=args.model_steps,
                 standardize=args.standardize)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratios"], indent=2))  # the script's output: its ratios (the table is above)


if __name__ == "__main__":
    main()
