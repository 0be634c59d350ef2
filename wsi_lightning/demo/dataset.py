"""The built-in demo dataset: synthetic slides, QuPath-style lesion annotations and a manifest.

Layout of ``out_dir``::

    slides/<slide_id>.tiff          Aperio-style JPEG pyramid (OpenSlide vendor 'aperio')
    annotations/<slide_id>.geojson  FeatureCollection of lesion polygons ('Tumor'), level-0
                                    pixels; task 'multiscale' adds its decoys under their own
                                    classes ('Decoy-architecture', 'Decoy-cells'); task
                                    'zoom' its candidate regions without the cue
                                    ('Candidate')
    manifest.csv                    slide_id, case_id, path, label, mpp (paths relative);
                                    task 'multitag' adds stain, species, organ (label = organ)
    .spec                           hash of the spec, written first (a resume must match it)
    .complete                       the same hash, written last: the set is complete
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from wsi_lightning.demo import multitag, zoom
from wsi_lightning.demo.synthetic import TASKS, decoy_outlines, render, sample_spec
from wsi_lightning.errors import ConfigError, WSIError
from wsi_lightning.slides.pyramid import write_pyramid_tiff

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when a change alters the pixels of a given spec
# per task, bumped when a change alters that task's pixels (older folders then fail to resume,
# with a message saying to delete them); multiscale 2: every region of a tumour slide is a lesion
# multiscale 3: every slide places 4 regions (tumour slides leave 2 empty), so both classes have
# the same cue area; zoom 2: 4 candidates (100-170 µm), 2-3 of them lesions (v1: 3, 90-160 µm, 1-2)
TASK_VERSIONS = {"multiscale": 3, "zoom": 2}
DEFAULTS = {
    "size_um": 1536.0,  # 3072 px at 0.5 µm/px
    "mpp": 0.5,
    "frac_40x": 0.0,  # fraction of slides written at mpp / 2 (same physical size, 4x pixels)
    "n_levels": 4,
    "tile": 256,
    "quality": 90,
    "pair_fraction": 0.15,  # fraction of slides that share their case with another slide
    "max_lesions": 4,
    "task": "lesion",  # "lesion" | "multiscale" | "multitag" | "zoom" (synthetic.TASKS)
}
N_SLIDES = 80  # default number of slides (task "multitag": multitag.DEMO_DEFAULTS)
TASK_DEFAULTS = {
    "multitag": {"size_um": multitag.DEMO_DEFAULTS["size_um"]},
    "zoom": zoom.DEFAULTS,
}
LABELS = ("normal", "tumor")
CLASS_COLOURS = {
    "Tumor": [200, 0, 0],
    "Decoy-architecture": [0, 120, 200],
    "Decoy-cells": [0, 160, 80],
    "Candidate": [0, 120, 200],
}


def spec_hash(n_slides: int, seed: int, options: dict) -> str:
    """Short hash of everything that determines the dataset's content.

    The default task is left out of the hash, so folders made before tasks existed still match.
    """
    options = {k: v for k, v in options.items() if not (k == "task" and v == DEFAULTS["task"])}
    task_v = {"task_v": TASK_VERSIONS[options["task"]]} if options.get("task") in TASK_VERSIONS else {}
    blob = json.dumps(
        {"v": GENERATOR_VERSION, "n": n_slides, "seed": seed, **options, **task_v}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_slides(n_slides: int, seed: int, options: dict) -> list[dict]:
    """Slide ids, cases, labels (balanced) and mpps, all deterministic from `seed`."""
    rng = np.random.default_rng([seed, 0])
    labels = np.array(["tumor"] * (n_slides // 2) + ["normal"] * (n_slides - n_slides // 2))
    labels = labels[rng.permutation(n_slides)]
    n_fine = round(options["frac_40x"] * n_slides)
    fine = np.zeros(n_slides, bool)
    fine[rng.choice(n_slides, n_fine, replace=False)] = True
    # pair some slides of the same label into one case (patient-level splits matter)
    case_of = np.arange(n_slides)
    n_pairs = round(options["pair_fraction"] * n_slides / 2)
    for k in range(n_pairs):
        label = LABELS[k % 2]
        free = [
            i
            for i in range(n_slides)
            if labels[i] == label and case_of[i] == i and not (case_of == i).sum() > 1
        ]
        if len(free) >= 2:
            a, b = rng.choice(free, 2, replace=False)
            case_of[max(a, b)] = min(a, b)
    case_ids = {c: f"case_{j:03d}" for j, c in enumerate(sorted(set(case_of.tolist())))}
    return [
        {
            "index": i,
            "slide_id": f"demo_{i:03d}",
            "case_id": case_ids[int(case_of[i])],
            "label": str(labels[i]),
            "mpp": options["mpp"] / 2 if fine[i] else options["mpp"],
        }
        for i in range(n_slides)
    ]


def _geojson(polygons: list[np.ndarray], decoys: dict[str, list[np.ndarray]] | None = None) -> dict:
    """QuPath-style FeatureCollection of 'Tumor' annotations (level-0 pixel coordinates), then
    the `decoys` (class name -> polygons), which never count as lesion."""
    features = []
    classes = [("Tumor", polygons), *(decoys or {}).items()]
    for name, polys in classes:
        for poly in polys:
            ring = np.round(poly, 2).tolist()
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": CLASS_COLOURS[name]},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_slide(job: dict) -> dict:
    """Render and write one slide + its annotation (skipped when both exist). Returns `job`."""
    out_dir, opts = Path(job["out_dir"]), job["options"]
    tiff = out_dir / "slides" / f"{job['slide_id']}.tiff"
    geo = out_dir / "annotations" / f"{job['slide_id']}.geojson"
    if tiff.exists() and geo.exists():
        return {**job, "skipped": True, "seconds": 0.0}
    start = time.perf_counter()
    rng = np.random.default_rng([job["seed"], 1, job["index"]])
    if opts["task"] == "multitag":
        spec = multitag.sample_spec(rng, job, opts["size_um"], job["mpp"])
    else:
        spec = sample_spec(
            rng,
            job["label"],
            job["slide_id"],
            opts["size_um"],
            job["mpp"],
            opts["max_lesions"],
            opts["task"],
        )
    image, polygons = render(spec)
    write_pyramid_tiff(tiff, image, job["mpp"], opts["n_levels"], opts["tile"], opts["quality"])
    _write_text(geo, json.dumps(_geojson(polygons, decoy_outlines(spec))))
    return {
        **job,
        "skipped": False,
        "seconds": time.perf_counter() - start,
        "n_lesions": len(polygons),
    }


def _check_resume(out_dir: Path, digest: str) -> bool:
    """True if `out_dir` already holds this complete set; error if it holds another spec."""
    for marker in (".complete", ".spec"):
        path = out_dir / marker
        if path.exists() and path.read_text().strip() != digest:
            raise WSIError(
                f"demo data folder {out_dir} was made with different settings (spec hash "
                f"{path.read_text().strip()} in {path}, now {digest}); delete the folder or "
                "choose another output folder"
            )
    return (out_dir / ".complete").exists()


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_slides: int | None = None,
    seed: int = 0,
    workers: int = 2,
    **spec,
) -> Path:
    """Generate (or finish generating) the synthetic demo dataset.

    Args:
        out_dir: output folder (created).
        n_slides: number of slides, half of them tumour; None: 80 (task ``"multitag"``: 360).
        seed: everything (labels, cases, pixels) is a function of the seed.
        workers: processes rendering slides in parallel (1 = in this process).
        **spec: overrides of ``DEFAULTS`` (size_um, mpp, frac_40x, n_levels, tile, quality,
            pair_fraction, max_lesions, task). ``task="multiscale"``: a tumour slide's lesion
            shows an abnormal architecture (seen with ~200 µm of context) AND atypical nuclei
            (seen at 0.5 µm/px) at the same place; every slide also has decoy regions with one
            of the two (see ``synthetic.sample_multiscale_regions``). ``task="multitag"``: every
            slide has a stain, a species and an organ tag (manifest columns; ``label`` = organ),
            correlated and imbalanced as in the Patch Transformer paper; slides default to
            1024 µm (see ``multitag.py``). ``task="zoom"``: 2 mm slides whose candidate regions
            (4 per slide, visible at low magnification) carry the deciding cue (cords of
            atypical nuclei, visible at high magnification) on tumour slides only (see
            ``zoom.py``).

    Returns:
        Path of ``manifest.csv``.
    """
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"demo data options {unknown} are unknown; valid: {sorted(DEFAULTS)}")
    task = spec.get("task", DEFAULTS["task"])
    _check_task(task)
    if n_slides is None:
        n_slides = multitag.DEMO_DEFAULTS["n_slides"] if task == "multitag" else N_SLIDES
    if n_slides < 2:
        raise ConfigError(f"demo data n_slides must be >= 2 (one per label), got {n_slides}")
    options = {**DEFAULTS, **TASK_DEFAULTS.get(task, {}), **spec}
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    digest = spec_hash(n_slides, seed, options)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    if _check_resume(out_dir, digest) and manifest.exists():
        log.info("demo data in %s is complete (spec %s)", out_dir, digest)
        return manifest
    _write_text(out_dir / ".spec", digest)
    plan = (multitag.plan_slides if task == "multitag" else plan_slides)(n_slides, seed, options)
    jobs = [{**row, "out_dir": str(out_dir), "seed": seed, "options": options} for row in plan]
    start = time.perf_counter()
    if workers <= 1:
        results = map(make_slide, jobs)
        _log_progress(results, len(jobs), start)
    else:
        # fork: no re-import of the caller's __main__ (spawn breaks under `python -` and
        # unguarded scripts); the workers only run numpy/PIL/tifffile code
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(min(workers, len(jobs)), _keep_freed_memory) as pool:
            _log_progress(pool.imap_unordered(make_slide, jobs), len(jobs), start)
    _write_manifest(manifest, plan, multitag.TAGS if task == "multitag" else ())
    _write_text(out_dir / ".complete", digest)
    log.info("demo data: %d slides in %s (%.1f s)", n_slides, out_dir, time.perf_counter() - start)
    return manifest


def _keep_freed_memory() -> None:
    """Pool initializer: glibc keeps freed blocks in the worker instead of unmapping them, so
    the painters' 16-Mpx temporaries do not fault in fresh pages each time (measured: 4.2 s of
    system time per two 4096 px slides down to 1.0 s). The workers exit when the set is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never give the heap back early


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"demo data option task={task!r} is unknown; valid: {list(TASKS)}")


def _log_progress(results, total: int, start: float) -> None:
    for done, res in enumerate(results, start=1):
        if res["skipped"]:
            log.debug("demo slide %s exists, skipped", res["slide_id"])
            continue
        log.info(
            "demo slide %d/%d %s (%s, %d lesions, %.1f s; %.0f s elapsed)",
            done,
            total,
            res["slide_id"],
            res["label"],
            res["n_lesions"],
            res["seconds"],
            time.perf_counter() - start,
        )


def _write_manifest(path: Path, plan: list[dict], tags: tuple[str, ...] = ()) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "case_id", "path", "label", "mpp", *tags])
        for row in plan:
            writer.writerow(
                [
                    row["slide_id"],
                    row["case_id"],
                    f"slides/{row['slide_id']}.tiff",
                    row["label"],
                    f"{row['mpp']:g}",
                    *(row[t] for t in tags),
                ]
            )
    os.replace(tmp, path)
