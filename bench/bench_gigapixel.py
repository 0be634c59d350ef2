"""Gigapixel slides: tiling + extraction memory and time must not grow faster than the tissue.

Two synthetic slides (``wsi_lightning.demo.gigapixel``, drawn once into the cache) of the same
design: 100,000 x 80,000 px at 0.25 µm/px (a 25 x 20 mm scan at 40x) and one 4x smaller in area
(50,000 x 40,000). Each runs the real pipeline (``extract_features``: tissue segmentation,
tiling, tile reads, the ``demo_cnn`` backbone, the feature store) with the ``_base.yaml`` tiling
(224 px at 0.5 µm/px, thumb_mpp 8), one process (DataLoader workers 0, one torch thread), in a
fresh subprocess, so its peak RSS (``VmHWM``: see ``gigapixel.peak_rss_mb``) is that run's alone. Where the time goes is
measured in the child: tiling (thumbnail, tissue mask, grid), tile reads (``SlideReader``
calls during prediction), the backbone forward, and the rest (tensor conversion, Lightning,
the store). The small slide is extracted a second time with tile reads through
``backend=openslide`` (the tissue thumbnail is read as in the first run), for the reader's share
of the same pipeline.

Ratios (the ``make bench`` table checks ``>=`` targets, so each is small / large):
    rss_small_over_large         peak RSS of the small run / the large one; ~1 when memory does
                                 not grow with the slide (target >= 0.8);
    ms_per_tile_small_over_large time per tissue tile, small / large; ~1 when time is linear in
                                 the number of tissue tiles (target >= 0.8);
    openslide_read_over_fast     OpenSlide's tile-read seconds / the fast reader's, same tiles.
The printed table has the figures (and large / small ratios) side by side.

    python -m bench --only gigapixel [--quick]      (quick: 16,000 x 12,800 and 8,000 x 6,400)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
SIZES = {"large": (100_000, 80_000), "small": (50_000, 40_000)}
QUICK_SIZES = {"large": (16_000, 12_800), "small": (8_000, 6_400)}
FEATURES = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 64,
            "num_workers": 0, "dtype": "float16", "precision": "fp32", "accelerator": "cpu", "devices": 1}


def _tiling() -> dict:
    """The default tiling (``experiments/_base.yaml``), without the multi-scale section."""
    base = yaml.safe_load((REPO / "experiments" / "_base.yaml").read_text())["tiling"]
    return {k: base[k] for k in ("tile_size", "mpp", "min_tissue", "thumb_mpp")}


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def _slide(cache: Path, size: tuple[int, int]) -> tuple[Path, dict]:
    """Draw the slide once (in a subprocess: its stats' peak RSS is the generator's own)."""
    from wsi_lightning.demo.gigapixel import GigaSpec, gigapixel_slide

    spec = GigaSpec(width=size[0], height=size[1])
    _run([sys.executable, "-m", "wsi_lightning.demo.gigapixel", str(cache), "--width", str(size[0]),
          "--height", str(size[1])], f"drawing the {size[0]}x{size[1]} slide")
    return gigapixel_slide(cache, spec)  # the cached file and the stats of the run that drew it


def _extract(slide: Path, work: Path, backend: str) -> dict:
    """One pipeline run in a fresh process; returns its record."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "result.json"
    _run([sys.executable, "-m", "bench.bench_gigapixel", "--child", str(slide), "--work", str(work),
          "--backend", backend, "--out", str(out)], f"extraction of {slide.name} ({backend})")
    return json.loads(out.read_text())


def _child(slide: Path, work: Path, backend: str) -> dict:
    """Inside the fresh process: the pipeline with timers around reads, model and tiling."""
    import pandas as pd
    import torch

    from wsi_lightning.demo.gigapixel import peak_rss_mb
    from wsi_lightning.features import extract
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.manifest import load_manifest
    from wsi_lightning.slides import SlideCache, SlideReader

    torch.set_num_threads(1)
    clock = {"read": 0.0, "model": 0.0, "tiling": 0.0}
    phase = ["predict"]  # reads inside tiling (the tissue thumbnail) count as tiling

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            if key == "tiling":
                phase[0] = "tiling"
            try:
                return fn(*args, **kwargs)
            finally:
                if key != "read" or phase[0] == "predict":
                    clock[key] += time.perf_counter() - t0
                if key == "tiling":
                    phase[0] = "predict"
        return wrapper

    SlideReader.read_at_mpp = timed(SlideReader.read_at_mpp, "read")
    extract.ExtractionModule.predict_step = timed(extract.ExtractionModule.predict_step, "model")
    extract.plan_manifest = timed(extract.plan_manifest, "tiling")
    extract._SLIDES = SlideCache(max_open=16, backend=backend)  # the tile reads' backend
    manifest_csv = work / "manifest.csv"
    pd.DataFrame([{"slide_id": "giga", "case_id": "giga", "path": str(slide), "label": "a"}]).to_csv(manifest_csv, index=False)
    store = FeatureStore(work / "store")
    tiling = _tiling()
    t0 = time.perf_counter()
    manifest = load_manifest(manifest_csv, classes=["a", "b"])  # one slide: the label is a placeholder
    written = extract.extract_features(manifest, store, tiling, FEATURES,
                                       tiles_dir=work / "tiles")
    total = time.perf_counter() - t0
    if written != ["giga"]:
        raise RuntimeError(f"extraction of {slide} wrote {written}, expected ['giga']")
    tiles = store.num_instances("giga")
    split = {k: round(v, 4) for k, v in clock.items()}
    split["rest"] = round(total - sum(clock.values()), 4)
    return {"backend": backend, "tissue_tiles": tiles, "seconds": round(total, 2),
            "tiles_per_s": round(tiles / total, 1), "s_per_1000_tiles": round(1000 * total / tiles, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "split_s": split,
            "reader_share": round(clock["read"] / total, 3), "tiling": tiling}


def _table(rows: dict[str, dict], gen: dict[str, dict]) -> Table:
    t = Table(title="gigapixel: tiling + extraction (demo_cnn, 1 process, 1 thread)")
    for col in ("run", "slide px", "tissue tiles", "seconds", "tiles/s", "s / 1000 tiles", "peak RSS MB",
                "read / model / tiling / rest s", "reader share", "draw s / RSS MB"):
        t.add_column(col)
    for key, r in rows.items():
        size = key.split("/")[0]
        g = gen[size]
        sp = r["split_s"]
        t.add_row(key, "x".join(map(str, g["levels"][0])), str(r["tissue_tiles"]), f"{r['seconds']:.1f}",
                  f"{r['tiles_per_s']:.1f}", f"{r['s_per_1000_tiles']:.2f}", f"{r['peak_rss_mb']:.0f}",
                  f"{sp['read']:.1f} / {sp['model']:.1f} / {sp['tiling']:.1f} / {sp['rest']:.1f}",
                  f"{r['reader_share']:.0%}", f"{g['seconds']:.0f} / {g['peak_rss_mb']:.0f}")
    large, small = rows["large/fast"], rows["small/fast"]
    t.add_row("large / small", "4.0x area", f"{large['tissue_tiles'] / small['tissue_tiles']:.2f}x",
              f"{large['seconds'] / small['seconds']:.2f}x", f"{large['tiles_per_s'] / small['tiles_per_s']:.2f}x",
              f"{large['s_per_1000_tiles'] / small['s_per_1000_tiles']:.2f}x",
              f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x", "", "", "")
    return t


def run(cache: Path, quick: bool = False) -> dict:
    """Draw (once) and extract both slides; returns the benchmark record (module docstring)."""
    sizes = QUICK_SIZES if quick else SIZES
    cache = Path(cache)
    gen, rows = {}, {}
    for name, size in sizes.items():
        path, gen[name] = _slide(cache / "slides", size)
        rows[f"{name}/fast"] = _extract(path, cache / "work" / f"{name}_fast", "fast")
        if name == "small":
            rows["small/openslide"] = _extract(path, cache / "work" / "small_openslide", "openslide")
    Console(width=160).print(_table(rows, gen))
    large, small, osl = rows["large/fast"], rows["small/fast"], rows["small/openslide"]
    ratios = {"rss_small_over_large": small["peak_rss_mb"] / large["peak_rss_mb"],
              "ms_per_tile_small_over_large": small["s_per_1000_tiles"] / large["s_per_1000_tiles"],
              "openslide_read_over_fast": osl["split_s"]["read"] / max(small["split_s"]["read"], 1e-9)}
    return {"name": "gigapixel", "ratios": ratios,
            "targets": {"rss_small_over_large": 0.8, "ms_per_tile_small_over_large": 0.8},
            "runs": rows, "generation": gen,
            "config": {"sizes": sizes, "features": FEATURES, "tiling": _tiling(), "torch_threads": 1,
                       "openslide_run": "small slide, tile reads through backend=openslide"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache" / "gigapixel")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.child:
        record = _child(a.child, a.work, a.backend)
        tmp = a.out.with_name(f".{a.out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, a.out)
        return
    print(json.dumps(run(a.cache, quick=a.quick), indent=2, default=float))


if __name__ == "__main__":
    main()
