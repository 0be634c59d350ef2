"""Does the ``task="multitag"`` demo data show its tags in random tissue patches? Time + check.

The default multitag demo set (360 slides of 1024 µm, seed 0) is generated (or reused) with 2
workers; the wall time and the CPU time of the generation are reported (the CPU time / 2 is the
wall time on 2 otherwise idle cores). Then, as the Patch Transformer's data pipeline does, random
patches are drawn from each slide's tissue (Otsu mask at 8 µm/px, >= 50% tissue in the box):
``--per-slide`` patches of 224 px and of 112 px at 0.5 µm/px.

Each patch gets ``multitag.patch_statistics``: colour statistics (mean RGB, optical-density
chromaticity) and texture statistics of the summed optical density (nuclei: share, count, size,
inscribed radius, aspect, chromatin; then band energies, orientation coherence, white share). A
nearest-centroid classifier on standardised features, scored out-of-fold with case-grouped
5-fold CV, predicts:

    stain    from the colour statistics
    species  from the nucleus statistics only (no colour: the species-stain correlation cannot
             help)
    organ    from the texture statistics (nuclei + architecture, no colour)

Reported per tag and patch size: patch-level accuracy and balanced accuracy (mean recall over
classes; chance = 1 / classes), slide-level accuracy (majority vote of the slide's patches) and
a logistic regression (same folds) as a stronger reference. The check passes when, for 224 px
patches, the stain's balanced accuracy is >= 0.95 and species' and organ's are >= 3x chance.

The data folder is reused when complete; delete it after changing the painters.

Run: ``python bench/check_multitag_demo.py [--per-slide 16] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsi_lightning.demo import make_demo_dataset, multitag
from wsi_lightning.slides import SlideReader, segment_tissue

log = logging.getLogger(__name__)

PATCH_MPP = 0.5
SIZES = (224, 112)
MIN_TISSUE = 0.5


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def random_patches(reader: SlideReader, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random tissue patches of `size` px at ``PATCH_MPP``. Returns (n, size, size, 3)."""
    tissue = segment_tissue(reader)
    side = size * PATCH_MPP / reader.mpp  # level-0 px
    w0, h0 = reader.dimensions
    xy = rng.uniform(0, 1, (4000, 2)) * (np.array([w0, h0]) - side)
    boxes = np.concatenate([xy, np.full((len(xy), 2), side)], 1)
    good = np.flatnonzero(tissue.fractions(boxes, reader.mpp) >= MIN_TISSUE)[:n]
    corners = np.round(xy[good]).astype(int)
    return np.stack([reader.read_at_mpp(tuple(c), (size, size), PATCH_MPP) for c in corners])


def scores(x: np.ndarray, y: np.ndarray, slide: np.ndarray, case: np.ndarray) -> dict:
    """Out-of-fold nearest-centroid (and logistic regression) scores, case-grouped 5-fold."""
    out = {}
    models = {
        "nearest_centroid": NearestCentroid(),
        "logreg": LogisticRegression(C=0.3, max_iter=3000),
    }
    for name, model in models.items():
        pred = np.empty(len(y), object)
        for train, test in GroupKFold(5).split(x, y, case):
            fitted = make_pipeline(StandardScaler(), model).fit(x[train], y[train])
            pred[test] = fitted.predict(x[test])
        votes = {s: _majority(pred[slide == s]) for s in np.unique(slide)}
        truth = {s: y[slide == s][0] for s in votes}
        out[name] = {
            "patch_acc": round(float((pred == y).mean()), 3),
            "patch_balanced_acc": round(float(balanced_accuracy_score(y, pred.astype(str))), 3),
            "slide_acc": round(float(np.mean([votes[s] == truth[s] for s in votes])), 3),
        }
    return out


def _majority(labels: np.ndarray) -> str:
    values, counts = np.unique(labels.astype(str), return_counts=True)
    return str(values[np.argmax(counts)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-slides", type=int, default=None, help="default: the task's (360)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-slide", type=int, default=16, help="random patches per slide and size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=str(Path(__file__).parent / ".cache" / "multitag_check"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = Path(args.data) / f"n{args.n_slides or 'default'}_s{args.seed}"
    fresh = not (data / ".complete").exists()
    wall, cpu = time.perf_counter(), cpu_seconds()
    manifest = make_demo_dataset(
        data, n_slides=args.n_slides, seed=args.seed, workers=args.workers, task="multitag"
    )
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    generation = {"fresh": fresh, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    results: dict = {"generation": {**generation, "workers": args.workers}}
    log.info(
        "data ready: %.1f s wall, %.1f s CPU (%s)", wall, cpu, "generated" if fresh else "reused"
    )
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    results["counts"] = {
        t: {c: sum(r[t] == c for r in rows) for c in multitag.CLASSES[t]} for t in multitag.TAGS
    }
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    feats: dict[int, list] = {s: [] for s in SIZES}
    meta: dict[int, list] = {s: [] for s in SIZES}
    for row in rows:
        reader = SlideReader(data / row["path"])
        for size in SIZES:
            x = multitag.patch_statistics(random_patches(reader, size, args.per_slide, rng))
            feats[size].append(x)
            meta[size] += [row] * len(x)
    log.info("patch statistics in %.0f s", time.perf_counter() - start)
    features = {
        "stain": multitag.COLOUR_FEATURES,
        "species": multitag.NUCLEUS_FEATURES,
        "organ": multitag.TEXTURE_FEATURES,
    }
    results["separability"] = {}
    for size in SIZES:
        x = np.concatenate(feats[size])
        slide = np.array([r["slide_id"] for r in meta[size]])
        case = np.array([r["case_id"] for r in meta[size]])
        res = results["separability"][f"{size}px"] = {"patches": len(x)}
        for tag in multitag.TAGS:
            y = np.array([r[tag] for r in meta[size]])
            res[tag] = scores(x[:, features[tag]], y, slide, case)
            res[tag]["chance"] = round(1 / len(multitag.CLASSES[tag]), 3)
            log.info("%4d px %-8s %s", size, tag, res[tag])
    by_tag = results["separability"]["224px"]
    nc = {t: by_tag[t]["nearest_centroid"]["patch_balanced_acc"] for t in multitag.TAGS}
    results["passed"] = bool(
        nc["stain"] >= 0.95
        and nc["species"] >= 3 / len(multitag.SPECIES)
        and nc["organ"] >= 3 / len(multitag.ORGANS)
    )
    verdict = "PASS" if results["passed"] else "FAIL"
    log.info("nearest centroid, 224 px, balanced accuracy: %s -> %s", nc, verdict)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
