"""Mechanism metrics: does a method look at the lesions? Pure numpy functions, one slide at a time,
and :func:`summarise`, which pools the per-slide records of the test slides into the scalars the
``mechanism`` callback logs as ``test/<name>``.

A *tumour slide* is a test slide whose annotation holds at least one lesion
(:func:`wsi_lightning.slides.annotations.load_lesions`); only those enter the lesion metrics.

MagNets (``MILOutput.roi_tree``, depth d = 1..L, L = leaves):
    roi_in_lesion_d{d}     mean over the tumour slides' depth-d ROIs of the share of the ROI's
                           area inside lesions (:func:`box_lesion_fraction`)
    roi_in_lesion          the same at the leaves (d = L)
    lesion_area_fraction   chance level: mean over tumour slides of lesion area / tissue area
                           (tissue mask points inside lesions; the slide's area when no mask)
    roi_in_lesion_ratio    roi_in_lesion / lesion_area_fraction (1 = no better than chance)
HAG-MIL (``MILOutput.tile_maps`` with ``index``, ``Bag.levels``; level l = 1..L-1):
    lesion_recall_l{l}     sum over tumour slides of the level-l lesion tiles the cascade scored
                           (the children kept by level l-1's top-k) / sum of all level-l lesion
                           tiles; lesion tile: tile rule of :func:`tile_labels`
    lesion_recall_min      the smallest lesion_recall_l{l}
    tiles_scored_finest    mean over all test slides of the finest-level tiles scored
    tiles_finest_all       mean over all test slides of the finest-level tiles (what a method
                           scoring every finest tile scores)
CS-MIL (``MILOutput.cross_scale`` (B, N, S)):
    cs_weight_s{k}_in      mean cross-scale weight of scale k over the tumour slides' lesion tiles
    cs_weight_s{k}_out     the same over their other tiles
Attention (``attention`` (B, N), or ``MILOutput.tile_scores``):
    loc_auc                ROC AUC of the tile scores, min-max normalised per slide, against tile
                           ground truth, pooled over the tumour slides' tiles
    loc_auc_slide          mean over tumour slides (with lesion and non-lesion tiles) of the
                           per-slide ROC AUC

A metric that applies but is undefined (no tumour slide, one class of tiles) is NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from wsi_lightning.slides.annotations import Lesion, in_lesions, tile_labels


# ----------------------------------------------------------------------------- geometry
def box_lesion_fraction(boxes: np.ndarray, lesions: list[Lesion], grid: int = 16) -> np.ndarray:
    """Share of each box's area inside lesions, on a ``grid`` x ``grid`` lattice of points at
    the centres of equal sub-rectangles (as ``tile_labels(rule='overlap')`` estimates it).

    Args:
        boxes: (K, 4) level-0 ``(x0, y0, x1, y1)``.
        lesions: the slide's lesions (empty: all 0).
        grid: points per side.

    Returns:
        (K,) float64 in [0, 1].
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not lesions or len(boxes) == 0:
        return np.zeros(len(boxes))
    g = (np.arange(grid) + 0.5) / grid
    offs = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)  # (G*G, 2) in [0, 1]^2
    size = boxes[:, 2:] - boxes[:, :2]  # (K, 2)
    pts = (boxes[:, None, :2] + offs[None] * size[:, None]).reshape(-1, 2)  # (K*G*G, 2)
    return in_lesions(pts, lesions).reshape(len(boxes), -1).mean(1)


def lesion_area_fraction(mask: np.ndarray, pixel_size: float, lesions: list[Lesion]) -> float:
    """Lesion share of a region mask: the fraction of the mask's pixels whose centre lies in a
    lesion (lesion area inside the region / region area).

    Args:
        mask: (h, w) bool, e.g. tissue; pixel (i, j) covers level-0 ``[j, j+1) * pixel_size``
            horizontally and ``[i, i+1) * pixel_size`` vertically.
        pixel_size: level-0 pixels per mask pixel.
        lesions: the slide's lesions.

    Returns:
        The fraction in [0, 1]; NaN when the mask is empty.
    """
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    hit = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    for les in lesions:  # only the mask pixels within each lesion's bounding box are tested
        lo, hi = les.exterior.min(0) / pixel_size, les.exterior.max(0) / pixel_size
        j0, i0 = max(0, math.floor(lo[0])), max(0, math.floor(lo[1]))
        j1, i1 = min(w, math.ceil(hi[0]) + 1), min(h, math.ceil(hi[1]) + 1)
        if j1 <= j0 or i1 <= i0:
            continue
        ii, jj = np.nonzero(mask[i0:i1, j0:j1])
        pts = np.stack([jj + j0 + 0.5, ii + i0 + 0.5], 1) * pixel_size  # (P, 2) level-0 centres
        inside = les.contains(pts)
        hit[ii[inside] + i0, jj[inside] + j0] = True
    return float(hit.sum() / total)


def slide_mask(width: float, height: float, max_side: int = 512) -> tuple[np.ndarray, float]:
    """The whole slide as a region mask (the fallback when no tissue mask is available).

    Returns:
        ((h, w) all-True mask of at most ``max_side`` pixels a side, level-0 px per mask pixel).
    """
    px = max(float(width), float(height), 1.0) / max_side
    return np.ones((max(1, math.ceil(height / px)), max(1, math.ceil(width / px))), dtype=bool), px


# ----------------------------------------------------------------------------- per slide
def roi_record(frames: Sequence[np.ndarray], lesions: list[Lesion], grid: int = 16) -> dict[str, float]:
    """MagNets: mean lesion share of the ROIs at each depth d = 1..L of one slide's tree.

    Args:
        frames: [(N_d, 4)] level-0 ``(x0, y0, x1, y1)`` per depth d = 0..L (0: the slide).

    Returns:
        {``roi_in_lesion_d{d}``: mean share of the depth-d ROIs}.
    """
    return {f"roi_in_lesion_d{d}": float(box_lesion_fraction(frames[d], lesions, grid).mean())
            for d in range(1, len(frames))}


def cascade_record(coords: Sequence[np.ndarray], extents: Sequence[float], scored: Sequence[np.ndarray],
                   lesions: list[Lesion], rule: str = "centre", min_overlap: float = 0.5) -> dict[str, int]:
    """HAG-MIL: per level, the slide's tiles, the tiles the cascade scored and how many of the
    lesion tiles it scored.

    Args:
        coords: [(N_l, 2)] level-0 top-left of every tile of level l (coarsest first).
        extents: tile side of each level in level-0 px.
        scored: [(K_l,)] indices (into level l) of the tiles the cascade scored.
        lesions: the slide's lesions; lesion tiles follow ``tile_labels(rule, min_overlap)``.

    Returns:
        {``tiles_l{l}``, ``scored_l{l}``, ``lesion_tiles_l{l}``, ``lesion_scored_l{l}``} per level.
    """
    out: dict[str, int] = {}
    for lvl, (xy, ext, idx) in enumerate(zip(coords, extents, scored, strict=True)):
        gt = tile_labels(np.asarray(xy), float(ext), lesions, rule, min_overlap)  # (N_l,)
        kept = np.zeros(len(gt), dtype=bool)
        kept[np.asarray(idx, dtype=np.int64)] = True
        out |= {f"tiles_l{lvl}": len(gt), f"scored_l{lvl}": int(kept.sum()),
                f"lesion_tiles_l{lvl}": int(gt.sum()), f"lesion_scored_l{lvl}": int((gt & kept).sum())}
    return out


def cross_scale_record(weights: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """CS-MIL: mean cross-scale weight per scale over one slide's lesion tiles and other tiles.

    Args:
        weights: (N, S) cross-scale weights of the slide's tiles.
        inside: (N,) bool tile ground truth.

    Returns:
        {``cs_weight_s{k}_in`` / ``_out``: mean (NaN without such tiles), ``cs_tiles_in`` / ``_out``}.
    """
    weights, inside = np.asarray(weights, dtype=np.float64), np.asarray(inside, dtype=bool)
    out: dict[str, float] = {"cs_tiles_in": int(inside.sum()), "cs_tiles_out": int((~inside).sum())}
    for k in range(weights.shape[1]):
        for side, sel in (("in", inside), ("out", ~inside)):
            out[f"cs_weight_s{k}_{side}"] = float(weights[sel, k].mean()) if sel.any() else float("nan")
    return out


def minmax(x: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) scaled to [0, 1] (all 0 when constant)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); NaN with one class only."""
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct value
    ranks = avg_rank[inv.reshape(-1)]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def attention_record(scores: np.ndarray, inside: np.ndarray) -> dict[str, Any]:
    """Attention: one slide's localisation AUC, and its min-max normalised scores and ground
    truth (``_scores``, ``_labels``: private, pooled by :func:`summarise`, not written out).

    Args:
        scores: (N,) attention or tile scores of the slide's tiles.
        inside: (N,) bool tile ground truth.
    """
    inside = np.asarray(inside, dtype=bool)
    norm = minmax(scores).astype(np.float32)
    return {"loc_auc": roc_auc(norm, inside), "tiles": len(inside), "lesion_tiles": int(inside.sum()),
            "_scores": norm, "_labels": inside}


# ----------------------------------------------------------------------------- pooled
def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _indices(records: list[dict[str, Any]], pattern: str) -> list[int]:
    """The sorted integers n of the keys matching ``pattern`` (one ``(\\d+)`` group) in any record."""
    found = (re.fullmatch(pattern, k) for r in records for k in r)
    return sorted({int(m.group(1)) for m in found if m})


def _roi_summary(records: list[dict[str, Any]], tumour: list[dict[str, Any]]) -> dict[str, float]:
    depths = _indices(records, r"roi_in_lesion_d(\d+)")
    if not depths:
        return {}
    out = {f"roi_in_lesion_d{d}": _mean([r.get(f"roi_in_lesion_d{d}", np.nan) for r in tumour]) for d in depths}
    out["roi_in_lesion"] = out[f"roi_in_lesion_d{depths[-1]}"]
    out["lesion_area_fraction"] = _mean([r.get("lesion_area_fraction", np.nan) for r in tumour])
    chance = out["lesion_area_fraction"]
    out["roi_in_lesion_ratio"] = out["roi_in_lesion"] / chance if chance > 0 else float("nan")
    return out


def _cascade_summary(records: list[dict[str, Any]], tumour: list[dict[str, Any]]) -> dict[str, float]:
    levels = _indices(records, r"tiles_l(\d+)")
    if not levels:
        return {}
    out: dict[str, float] = {}
    for lvl in levels[1:]:
        total = sum(r.get(f"lesion_tiles_l{lvl}", 0) for r in tumour)
        hit = sum(r.get(f"lesion_scored_l{lvl}", 0) for r in tumour)
        out[f"lesion_recall_l{lvl}"] = hit / total if total else float("nan")
    recalls = [v for v in out.values() if not math.isnan(v)]
    out["lesion_recall_min"] = min(recalls) if len(recalls) == len(out) and recalls else float("nan")
    fin = levels[-1]
    with_levels = [r for r in records if f"tiles_l{fin}" in r]
    out["tiles_scored_finest"] = _mean([r[f"scored_l{fin}"] for r in with_levels])
    out["tiles_finest_all"] = _mean([r[f"tiles_l{fin}"] for r in with_levels])
    return out


def _cross_scale_summary(records: list[dict[str, Any]], tumour: list[dict[str, Any]]) -> dict[str, float]:
    scales = _indices(records, r"cs_weight_s(\d+)_in")
    out = {}
    for k in scales:
        for side in ("in", "out"):
            pairs = [(r[f"cs_weight_s{k}_{side}"], r[f"cs_tiles_{side}"]) for r in tumour
                     if f"cs_weight_s{k}_{side}" in r and r[f"cs_tiles_{side}"] > 0]
            n = sum(c for _, c in pairs)
            out[f"cs_weight_s{k}_{side}"] = sum(v * c for v, c in pairs) / n if n else float("nan")
    return out


def _attention_summary(records: list[dict[str, Any]], tumour: list[dict[str, Any]]) -> dict[str, float]:
    if not any("loc_auc" in r for r in records):
        return {}
    have = [r for r in tumour if "_scores" in r]
    pooled = (roc_auc(np.concatenate([r["_scores"] for r in have]), np.concatenate([r["_labels"] for r in have]))
              if have else float("nan"))
    return {"loc_auc": pooled, "loc_auc_slide": _mean([r["loc_auc"] for r in have])}


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Pool per-slide records (one per test slide: ``slide_id``, ``lesions`` (number of lesion
    polygons, 0 when unannotated) and the keys of the ``*_record`` functions it got) into the
    metrics of the module docstring, without the ``test/`` prefix. Metric families no record
    has are left out; those that apply but are undefined are NaN."""
    tumour = [r for r in records if r.get("lesions", 0) > 0]
    out: dict[str, float] = {}
    for part in (_roi_summary, _cascade_summary, _cross_scale_summary, _attention_summary):
        out |= part(records, tumour)
    return out
