"""Is the ``task="zoom"`` demo a coarse-to-fine task? Probes at each magnification.

A zoom demo set is generated (or reused) and, on every slide, windows of 64 µm are drawn from
three groups:

    lesion     inside a 'Tumor' region (a candidate region with the deciding cue)
    candidate  inside a 'Candidate' region (same density and stain, no cue)
    normal     tissue whose 192 µm surroundings touch no region

("inside": the 96 µm box around the window's centre is >= 90% in the region.) Each window is
read at 0.5, 1, 2, 4, 8 and 16 µm/px (128 down to 4 px: what a model that looks at that
magnification has) and described by the random ``demo_cnn`` features of the read resized to
112 px plus colour and texture statistics (per-channel mean, sd and 10/50/90th percentiles of
the optical density, gradient magnitude, Laplacian energy). A logistic regression
(standardised features, C chosen by an inner slide-grouped CV) is scored out of fold with
slide-grouped K-fold:

    candidate  candidate regions (lesions included) vs normal tissue: visible at every
               magnification, so a model can find them at low magnification
    cue        lesion vs candidate: the deciding cue, plain from 4 µm/px down (8 and 16 µm/px
               reported)

Then what a model that never zooms sees, on a 32 µm/px thumbnail (a 64 px image of the slide):

    thumbnail_cue  each region's mean and sd colour, lesion vs candidate (out-of-fold AUC)
    shortcuts      one number per slide (tissue fraction, dark fraction, mean colour, size),
                   label AUC of a leave-one-out logistic regression, either direction
    paired         the same slides drawn as tumour and as normal (same seed: same tissue, stain
                   and regions; only the cue differs): effect size of the label on each slide
                   statistic and on each lesion's mean colour (paired difference / sd across
                   slides or regions). This one is free of the sampling noise of the two above
                   (with 40 slides an AUC of 0.7 in either direction happens by chance)

The check passes when the candidates are visible at every magnification (>= 0.9), the cue
from 4 µm/px down (>= 0.9), and every paired effect is within +-0.2 (a classifier on it has
label AUC <= ~0.56).

The data folder is reused when complete; delete it after changing the painters.

Run: ``python bench/check_zoom_demo.py [--n-slides 40] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import LeaveOneOut, cross_val_predict

from wsi_lightning.demo import make_demo_dataset
from wsi_lightning.features.backbones import build_backbone
from wsi_lightning.slides import SlideReader, segment_tissue

try:  # python -m bench.check_zoom_demo
    from bench.check_multiscale_demo import _box_fraction, _fit_predict, _model
except ImportError:  # python bench/check_zoom_demo.py
    from check_multiscale_demo import _box_fraction, _fit_predict, _model

log = logging.getLogger(__name__)

WINDOW_UM = 64.0
MPPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
GROUPS = ("lesion", "candidate", "normal")
CLASS_OF = {"Tumor": "lesion", "Candidate": "candidate"}
MASK_UM = 4.0  # as check_multiscale_demo's _box_fraction
INSIDE_UM = 96.0  # a region window has this box >= 90% inside its region
CLEAR_UM = 192.0  # a normal window has this box clear of every region
THUMB_MPP = 32.0  # a 64 px thumbnail of a 2 mm slide (MagNets' layer 1 sees 32-56 px)


def _region_masks(geojson: dict, slide_um: float, mpp: float) -> dict[str, np.ndarray]:
    n = int(np.ceil(slide_um / MASK_UM))
    images = {g: Image.new("1", (n, n), 0) for g in CLASS_OF.values()}
    for feature in geojson["features"]:
        group = CLASS_OF[feature["properties"]["classification"]["name"]]
        ring = np.asarray(feature["geometry"]["coordinates"][0]) * mpp / MASK_UM
        ImageDraw.Draw(images[group]).polygon([tuple(p) for p in ring.tolist()], fill=1)
    return {g: np.asarray(img) for g, img in images.items()}


def window_groups(root: Path, row: dict, rng: np.random.Generator, per_group: int) -> list[tuple]:
    """Window centres (microns) of each group on one slide, at most `per_group` each.

    Returns:
        [(group, cx_um, cy_um), ...].
    """
    reader = SlideReader(root / row["path"])
    slide_um = reader.dimensions[0] * reader.mpp
    geo = json.loads((root / "annotations" / f"{row['slide_id']}.geojson").read_text())
    masks = _region_masks(geo, slide_um, reader.mpp)
    any_region = np.logical_or.reduce(list(masks.values()))
    tissue = segment_tissue(reader)
    found: dict[str, list] = {g: [] for g in GROUPS}
    for cy in np.arange(WINDOW_UM, slide_um - WINDOW_UM, WINDOW_UM / 2):
        for cx in np.arange(WINDOW_UM, slide_um - WINDOW_UM, WINDOW_UM / 2):
            box = np.array([[cx - WINDOW_UM / 2, cy - WINDOW_UM / 2, WINDOW_UM, WINDOW_UM]])
            if tissue.fractions(box / reader.mpp, reader.mpp)[0] < 0.95:
                continue
            for group, mask in masks.items():
                if _box_fraction(mask, cx, cy, INSIDE_UM) >= 0.9:
                    found[group].append((group, cx, cy))
            if _box_fraction(any_region, cx, cy, CLEAR_UM) == 0:
                found["normal"].append(("normal", cx, cy))
    picked = []
    for tiles in found.values():
        order = rng.permutation(len(tiles))[:per_group]
        picked += [tiles[i] for i in sorted(order)]
    return picked


def _stats(img: np.ndarray) -> np.ndarray:
    """Colour and texture statistics of one (h, w, 3) uint8 read. Returns (19,) float."""
    od = -np.log(np.clip(img.astype(np.float64), 1, 255) / 255)
    flat = od.reshape(-1, 3)
    grey = od.mean(2)
    grad = np.hypot(*np.gradient(grey)) if min(grey.shape) > 1 else np.zeros(1)
    lap = ndimage.laplace(grey)
    return np.concatenate([flat.mean(0), flat.std(0), *np.percentile(flat, [10, 50, 90], axis=0),
                           [grad.mean(), grad.std(), (lap**2).mean(), grey.std()]])


@torch.no_grad()
def window_features(reader: SlideReader, centres: list[tuple], backbone) -> np.ndarray:
    """Features of every window at every magnification. Returns (n, len(MPPS), D) float32."""
    out = []
    for mpp in MPPS:
        side = round(WINDOW_UM / mpp)
        reads = []
        for _, cx, cy in centres:
            half = WINDOW_UM / 2 / reader.mpp
            top_left = (round(cx / reader.mpp - half), round(cy / reader.mpp - half))
            reads.append(reader.read_at_mpp(top_left, (side, side), mpp))
        big = np.stack([np.asarray(Image.fromarray(r).resize((112, 112), Image.BILINEAR))
                        for r in reads])
        x = torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255  # (n, 3, 112, 112)
        cnn = backbone(x).numpy()
        out.append(np.concatenate([cnn, np.stack([_stats(r) for r in reads])], 1))
    return np.stack(out, 1).astype(np.float32)


def oof_auc(x: np.ndarray, y: np.ndarray, y_slide: np.ndarray, groups: np.ndarray,
            n_folds: int) -> float:
    """Out-of-fold AUC of a logistic regression; C chosen per outer fold by an inner CV."""
    return round(float(roc_auc_score(y, _fit_predict(x, y, y_slide, groups, n_folds))), 3)


def thumbnail_regions(root: Path, row: dict) -> list[tuple[bool, np.ndarray]]:
    """Per region of one slide: (is lesion, mean and sd of its RGB optical density on a
    THUMB_MPP thumbnail), i.e. what a model that never zooms sees of it."""
    reader = SlideReader(root / row["path"])
    thumb, mpp = reader.thumbnail(mpp=THUMB_MPP)
    od = -np.log(np.clip(thumb.astype(np.float64), 1, 255) / 255)
    geo = json.loads((root / "annotations" / f"{row['slide_id']}.geojson").read_text())
    out = []
    for feature in geo["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0]) * reader.mpp / mpp
        img = Image.new("1", thumb.shape[1::-1], 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in ring.tolist()], fill=1)
        inside = np.asarray(img)
        if inside.any():
            px = od[inside]
            lesion = feature["properties"]["classification"]["name"] == "Tumor"
            out.append((lesion, np.concatenate([px.mean(0), px.std(0)])))
    return out


def slide_shortcuts(root: Path, rows: list[dict]) -> dict[str, float]:
    """Label AUC of one-number-per-slide predictors (leave-one-out logistic regression)."""
    values: dict[str, list[float]] = {"tissue_fraction": [], "dark_fraction": [], "mean_od": [],
                                      "size_px": []}
    for row in rows:
        reader = SlideReader(root / row["path"])
        thumb = reader.thumbnail(max_size=256)[0].astype(np.float64)
        od = -np.log(np.clip(thumb, 1, 255) / 255).sum(2)
        tissue = od > 0.25
        values["tissue_fraction"].append(float(tissue.mean()))
        dark = od > 1.5 * np.median(od[tissue])  # candidate-like: much darker than the tissue
        values["dark_fraction"].append(float(dark.mean()))
        values["mean_od"].append(float(od[tissue].mean()))
        values["size_px"].append(float(reader.dimensions[0] * reader.dimensions[1]))
    y = np.array([row["label"] == "tumor" for row in rows], int)
    out = {}
    for name, v in values.items():
        x = np.asarray(v)[:, None]
        if np.ptp(x) == 0:
            out[name] = 0.5
            continue
        p = cross_val_predict(_model(1.0), x, y, cv=LeaveOneOut(), method="decision_function")
        auc = roc_auc_score(y, p)
        out[name] = round(float(max(auc, 1 - auc)), 3)  # either direction counts as a shortcut
    return out


def paired_shortcuts(n_pairs: int, seed: int) -> dict[str, float]:
    """What the label changes on a thumbnail, free of sampling noise: the same slide drawn as
    tumour and as normal (same seed: the same tissue, stain and regions; only the cue differs).

    Returns the effect size (mean paired difference / sd across slides) of each slide statistic
    of the THUMB_MPP thumbnail (tissue fraction, dark fraction, mean and sd of the optical
    density), and of each lesion region's mean optical density per channel (against the sd of
    that mean across all regions). |effect| <= 0.2 means a classifier on that number has
    label AUC <= ~0.56.
    """
    from wsi_lightning.demo.paint import Canvas, polygon_mask
    from wsi_lightning.demo.synthetic import render, sample_spec

    factor = round(THUMB_MPP / 0.5)
    stats: dict[str, list[tuple[float, float]]] = {}
    regions: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(n_pairs):
        pair = {}
        for label in ("tumor", "normal"):
            spec = sample_spec(np.random.default_rng([seed, 9, k]), label, f"p{k}", task="zoom",
                               size_um=2048.0)
            image, _ = render(spec)
            pair[label] = (spec, -np.log(np.clip(np.asarray(
                Image.fromarray(image).reduce(factor)).astype(np.float64), 1, 255) / 255))
        for label, (_, od) in pair.items():
            total = od.sum(-1)
            tissue = total > 0.25
            values = {"tissue_fraction": tissue.mean(), "mean_od": total[tissue].mean(),
                      "sd_od": total[tissue].std(),
                      "dark_fraction": (total > 1.5 * np.median(total[tissue])).mean()}
            for name, v in values.items():
                stats.setdefault(name, []).append((label == "tumor", float(v)))
        spec = pair["tumor"][0]
        for region in spec.lesions + spec.candidates:
            mask = polygon_mask(Canvas.empty(*pair["tumor"][1].shape[:2], THUMB_MPP),
                                [region.outline_um()])
            if mask.any():
                regions.append((pair["tumor"][1][mask].mean(0), pair["normal"][1][mask].mean(0))
                               if region in spec.lesions else (None, pair["tumor"][1][mask].mean(0)))
    out = {}
    for name, pairs in stats.items():
        t = np.array([v for is_t, v in pairs if is_t])
        n = np.array([v for is_t, v in pairs if not is_t])
        out[name] = round(float((t - n).mean() / (np.concatenate([t, n]).std() + 1e-12)), 3)
    spread = np.stack([r[1] for r in regions]).std(0)  # (3,) sd of region colours
    diffs = np.stack([r[0] - r[1] for r in regions if r[0] is not None])  # (n_lesions, 3)
    for c, name in enumerate("rgb"):
        out[f"lesion_od_{name}"] = round(float(diffs[:, c].mean() / (spread[c] + 1e-12)), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-slides", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-group", type=int, default=12, help="most windows per group and slide")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--pairs", type=int, default=12, help="slides drawn as tumour and as normal")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=str(Path(__file__).parent / ".cache" / "zoom_check"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    start = time.perf_counter()
    data = Path(args.data) / f"n{args.n_slides}_s{args.seed}"
    manifest = make_demo_dataset(data, n_slides=args.n_slides, seed=args.seed,
                                 workers=args.workers, task="zoom")
    log.info("data ready in %.1f s", time.perf_counter() - start)
    backbone = build_backbone("demo_cnn").eval()
    rng = np.random.default_rng(args.seed)
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    feats, groups, slides, labels = [], [], [], []
    for row in rows:
        centres = window_groups(data, row, rng, args.per_group)
        feats.append(window_features(SlideReader(data / row["path"]), centres, backbone))
        groups += [c[0] for c in centres]
        slides += [row["slide_id"]] * len(centres)
        labels += [row["label"] == "tumor"] * len(centres)
    x, group, slide, y_slide = (np.concatenate(feats), np.array(groups), np.array(slides),
                                np.array(labels, int))
    counts = {g: int((group == g).sum()) for g in GROUPS}
    log.info("windows per group: %s from %d slides", counts, len(rows))
    res = {"n_slides": args.n_slides, "windows": counts, "candidate": {}, "cue": {}}
    region = cue = group != "normal"
    for i, mpp in enumerate(MPPS):
        res["candidate"][str(mpp)] = oof_auc(x[:, i], region.astype(int), y_slide, slide, args.folds)
        res["cue"][str(mpp)] = oof_auc(x[cue, i], (group[cue] == "lesion").astype(int),
                                       y_slide[cue], slide[cue], args.folds)
        log.info("%4.1f µm/px: candidate vs normal %.3f, lesion vs candidate (cue) %.3f", mpp,
                 res["candidate"][str(mpp)], res["cue"][str(mpp)])
    regions = [(row["slide_id"], *r) for row in rows for r in thumbnail_regions(data, row)]
    rid = np.array([r[0] for r in regions])
    ry = np.array([r[1] for r in regions], int)
    rx = np.stack([r[2] for r in regions])
    res["thumbnail_cue"] = oof_auc(rx, ry, ry, rid, args.folds)
    log.info("%g µm/px thumbnail: lesion vs candidate region colour %.3f (%d regions)", THUMB_MPP,
             res["thumbnail_cue"], len(regions))
    res["shortcuts"] = slide_shortcuts(data, rows)
    log.info("slide-level shortcuts (label AUC, %d slides; sampling noise included): %s",
             len(rows), res["shortcuts"])
    res["paired"] = paired_shortcuts(args.pairs, args.seed)
    log.info("paired tumour/normal versions of %d slides, effect sizes on the thumbnail: %s",
             args.pairs, res["paired"])
    c, q = res["candidate"], res["cue"]
    res["passed"] = bool(
        min(c.values()) >= 0.9 and min(q[str(m)] for m in MPPS if m <= 4) >= 0.9
        and max(abs(v) for v in res["paired"].values()) <= 0.2
    )
    res["seconds"] = round(time.perf_counter() - start, 1)
    log.info("%s (%.0f s)", "PASS" if res["passed"] else "FAIL", res["seconds"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
