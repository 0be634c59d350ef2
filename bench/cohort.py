"""A simulated cohort for ``bench_cohort``: realistic bag sizes, written once, in two formats.

``COHORT`` slides with log-normal bag sizes (median ``median``, log-sd ``sigma``, clipped to
``n_min``..``n_max``; the default 2,000 slides average ~3,000 instances) of ``dim``-d float16
features, written with the real :class:`FeatureStore` (``<dir>/store``) and as whole-bag
``<dir>/pt_files/<slide>.pt`` (``{"features": (N, D) float16, "coords": (N, 2) int64}``, one
``torch.save`` per slide): ~12 GB each at the default size. ``<dir>/manifest.csv`` lists every
slide (``split=train``, labels alternating).

Generation is resumable: each slide is written atomically (the store's temp-folder rename; a
temporary ``.pt`` moved into place with ``os.replace``), its size and values come from
(seed, slide index) alone, and ``<dir>/cohort.json`` records the configuration first and
``complete: true`` last, so an interrupted generation continues where it stopped and a finished
cohort is reused as it is. A folder made with another configuration is refused. One generator
per folder at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsi_lightning.features.store import FeatureStore

log = logging.getLogger(__name__)

COHORT = {"n_slides": 2000, "median": 2500, "sigma": 0.6, "n_min": 500, "n_max": 12000,
          "dim": 1024, "seed": 0, "v": 1}
QUICK_COHORT = {**COHORT, "n_slides": 96, "median": 1000, "n_min": 200, "n_max": 4000}
_ATTRS = {"mpp": 0.5, "tile_size": 224, "tile_size_um": 112.0, "level": 0, "extent_level0": 224,
          "backbone": "bench_cohort", "weights_hash": "none", "extraction": {}}


def slide_ids(cfg: dict) -> list[str]:
    return [f"slide_{i:05d}" for i in range(cfg["n_slides"])]


def bag_sizes(cfg: dict) -> np.ndarray:
    """(n_slides,) int64 instances per slide, log-normal, from the seed alone."""
    rng = np.random.default_rng([cfg["seed"], 0])
    n = rng.lognormal(np.log(cfg["median"]), cfg["sigma"], cfg["n_slides"])
    return np.clip(np.rint(n), cfg["n_min"], cfg["n_max"]).astype(np.int64)


def cohort_bytes(cfg: dict) -> int:
    """Bytes of one format's features + coords."""
    return int(bag_sizes(cfg).sum()) * (cfg["dim"] * 2 + 16)


def _bag(cfg: dict, pool: np.ndarray, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Slide i's (n, D) float16 features (a window of the shared random pool) and (n, 2) coords."""
    rng = np.random.default_rng([cfg["seed"], 2, i])
    start = int(rng.integers(0, len(pool) - n + 1))
    feats = np.ascontiguousarray(pool[start : start + n])  # a copy: torch.save of a view saves the pool
    side = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    coords = np.stack([idx % side, idx // side], 1).astype(np.int64) * _ATTRS["extent_level0"]  # (n, 2)
    return feats, coords


def _write_pt(path: Path, feats: np.ndarray, coords: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    torch.save({"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}, tmp)
    os.replace(tmp, path)


def _remove_stale_temps(pt_dir: Path) -> None:
    """Temporary ``.pt`` files of dead generators (``.<slide>.<pid>.tmp``)."""
    for tmp in pt_dir.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        alive = pid.isdigit() and int(pid) != os.getpid() and Path(f"/proc/{pid}").exists()
        if not alive:
            tmp.unlink(missing_ok=True)


def _write_stamp(stamp: Path, cfg: dict, complete: bool) -> None:
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"config": cfg, "complete": complete}, indent=2))
    os.replace(tmp, stamp)


def _check_stamp(root: Path, cfg: dict) -> bool:
    """Whether ``root`` holds this cohort complete; refuses one made with another configuration."""
    stamp = root / "cohort.json"
    if not stamp.exists():
        return False
    rec = json.loads(stamp.read_text())
    if rec.get("config") != cfg:
        raise FileExistsError(f"{root} holds a cohort made with {rec.get('config')}, not {cfg}; "
                              f"pass another --cohort-dir, or delete {root}")
    return bool(rec.get("complete"))


def _check_space(root: Path, cfg: dict, todo: np.ndarray) -> None:
    """Refuse to start a generation the disk cannot hold (both formats of the slides to write)."""
    need = int(todo.sum()) * (cfg["dim"] * 2 + 16) * 2 * 1.05 + 2**30
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(f"{root}: the cohort's remaining slides need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                      "are free; choose fewer slides (--slides N) or a --cohort-dir on a bigger disk")


def ensure_cohort(root: Path, cfg: dict) -> dict:
    """Generate (or finish, or reuse) the cohort in ``root``.

    Returns:
        ``{"written": slides written now, "seconds": time spent}``.
    """
    from rich.progress import Progress

    root.mkdir(parents=True, exist_ok=True)
    if _check_stamp(root, cfg):
        return {"written": 0, "seconds": 0.0}
    _write_stamp(root / "cohort.json", cfg, complete=False)
    store, pt_dir = FeatureStore(root / "store"), root / "pt_files"
    pt_dir.mkdir(exist_ok=True)
    store.clean_partial()
    _remove_stale_temps(pt_dir)
    ids, sizes = slide_ids(cfg), bag_sizes(cfg)
    todo = [i for i, sid in enumerate(ids) if not (store.is_complete(sid) and (pt_dir / f"{sid}.pt").exists())]
    _check_space(root, cfg, sizes[todo])
    log.info("cohort %s: writing %d of %d slides (%.1f GB per format)", root, len(todo), len(ids),
             cohort_bytes(cfg) / 1e9)
    t0 = time.perf_counter()
    pool = np.random.default_rng([cfg["seed"], 1]).standard_normal(
        (cfg["n_max"] + 4096, cfg["dim"]), dtype=np.float32).astype(np.float16)  # (n_max + 4096, D)
    with Progress(transient=True) as bar:
        task = bar.add_task("writing the cohort", total=len(todo))
        for i in todo:
            feats, coords = _bag(cfg, pool, i, int(sizes[i]))
            store.write_slide(ids[i], feats, coords, _ATTRS)
            _write_pt(pt_dir / f"{ids[i]}.pt", feats, coords)
            bar.advance(task)
    pd.DataFrame({"slide_id": ids, "case_id": [f"case_{s[6:]}" for s in ids],
                  "path": [f"slides/{s}.tiff" for s in ids],
                  "label": [("normal", "tumor")[i % 2] for i in range(len(ids))],
                  "split": "train"}).to_csv(root / "manifest.csv", index=False)
    _write_stamp(root / "cohort.json", cfg, complete=True)
    return {"written": len(todo), "seconds": round(time.perf_counter() - t0, 1)}
