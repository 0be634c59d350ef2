"""Mechanism metrics at test time: does each method look at the annotated lesions?

After every test batch the callback measures what applies to the method's ``MILOutput``
(see :mod:`wsi_lightning.analysis.mechanism` for the definitions) on each slide of the batch:

    roi            ``MILOutput.roi_tree`` (MagNets): lesion share of the ROIs per depth, and the
                   chance level (lesion / tissue area, the tissue segmented on the slide's
                   thumbnail, read from the batch's ``paths`` or the manifest)
    recall         ``MILOutput.tile_maps`` with ``index`` per level, plus ``Bag.levels`` (HAG-MIL):
                   the cascade's recall of lesion tiles per level, tiles scored
    cross_scale    ``MILOutput.cross_scale`` (B, N, S) (CS-MIL): weights in vs outside lesions
    localisation   ``attention`` (B, N) (or map ``attention_map`` of (B, H, N)), else
                   ``MILOutput.tile_scores`` (CHOWDER): localisation AUCs

Families a method's output lacks are skipped silently. Lesions come from the datamodule's
manifest (column ``annotation`` or ``<manifest folder>/annotations/<slide_id>.geojson``); rows
with ``exclude_localisation`` true are not used as tumour slides. At the end of the test epoch
the per-slide records of all ranks are gathered (each slide once, the first seen), pooled, logged
as ``test/<name>`` (rank 0; they reach ``metrics.json`` through ``trainer.callback_metrics``) and
written, one row per slide, to ``<run folder>/mechanism.csv``. A metric that applies but is
undefined (no tumour slide among the annotated test slides) is logged as NaN, so a table's
columns are always there; when no test slide has an annotation at all nothing is logged.

All bags of a slide must be in one batch (the datamodules' test-time bag sampling does this): a
slide's rows in a batch are merged (one value per tile location, the mean), later repeats ignored.
Patient-level bags (``data.bag_level=case``) are split back into their slides
(:func:`~wsi_lightning.data.batch.slide_parts`): each slide is measured against its own
lesions and tile geometry, one record per slide (with its ``case_id``); the attention-based
families (localisation, cross-scale) apply, the others need DataModules that build slide bags.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from wsi_lightning.analysis import mechanism as mech
from wsi_lightning.data.batch import slide_parts
from wsi_lightning.errors import ArgumentError, WSIError
from wsi_lightning.registry import CALLBACKS
from wsi_lightning.slides.annotations import (
    TILE_RULES,
    Lesion,
    find_annotation,
    load_lesions,
    tile_labels,
)

log = logging.getLogger(__name__)
FAMILIES = ("roi", "recall", "cross_scale", "localisation")
CSV_NAME = "mechanism.csv"


def _is_number(value: Any, integer: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if integer else int | float)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def _check_args(metrics: Any, tile_rule: Any, min_overlap: Any, grid: Any, attention_map: Any,
                tissue_mpp: Any, write_csv: Any) -> list[str] | None:
    """Validate the callback's arguments (ArgumentError naming the bad one); the metric families."""
    if metrics is not None:
        names = [metrics] if isinstance(metrics, str) else list(metrics)
        bad = [m for m in names if m not in FAMILIES]
        if bad or not names:
            raise ArgumentError(f"mechanism: metrics={metrics!r}; expected a non-empty list of "
                                f"{list(FAMILIES)} or null (all that apply)")
        metrics = names
    if tile_rule not in TILE_RULES:
        raise ArgumentError(f"mechanism: tile_rule={tile_rule!r}; expected one of {list(TILE_RULES)}")
    if not _is_number(min_overlap) or not 0 < min_overlap <= 1:
        raise ArgumentError(f"mechanism: min_overlap={min_overlap!r}; expected a number in (0, 1]")
    if not _is_number(grid, integer=True) or grid < 2:
        raise ArgumentError(f"mechanism: grid={grid!r}; expected an integer >= 2")
    if not _is_number(attention_map, integer=True):
        raise ArgumentError(f"mechanism: attention_map={attention_map!r}; expected an integer "
                            "(a map index, -1 for the last)")
    if not _is_number(tissue_mpp) or not tissue_mpp > 0:
        raise ArgumentError(f"mechanism: tissue_mpp={tissue_mpp!r}; expected a number > 0 (µm/px)")
    if not isinstance(write_csv, bool):
        raise ArgumentError(f"mechanism: write_csv={write_csv!r}; expected true or false")
    return metrics


@CALLBACKS.register("mechanism")
class Mechanism(L.Callback):
    """Log mechanism metrics (``test/roi_in_lesion``, ``test/lesion_recall_l1``,
    ``test/loc_auc``...) and write ``mechanism.csv`` after testing. No images.

    Args:
        metrics: families to compute, any of ``roi | recall | cross_scale | localisation``;
            null: every family the method's outputs allow.
        tile_rule: tile ground truth, ``centre`` (tile centre in a lesion) or ``overlap``.
        min_overlap: lesion area fraction a tile needs under ``overlap``, in (0, 1].
        grid: points per side of the lattice that estimates an ROI's lesion share.
        attention_map: which map of (B, H, N) attention is scored (-1: the last, DSMIL's
            positive-class map of a binary task).
        tissue_mpp: µm/px of the thumbnail the chance level's tissue is segmented on.
        write_csv: write ``<run folder>/mechanism.csv``.
    """

    def __init__(self, metrics: list[str] | None = None, tile_rule: str = "centre", min_overlap: float = 0.5,
                 grid: int = 16, attention_map: int = -1, tissue_mpp: float = 8.0, write_csv: bool = True) -> None:
        metrics = _check_args(metrics, tile_rule, min_overlap, grid, attention_map, tissue_mpp, write_csv)
        self.families = tuple(metrics or FAMILIES)
        self.tile_rule, self.min_overlap, self.grid = tile_rule, float(min_overlap), grid
        self.attention_map, self.tissue_mpp, self.write_csv = attention_map, float(tissue_mpp), write_csv
        self._records: dict[str, dict[str, Any]] = {}
        self._lesions: dict[str, tuple[list[Lesion], str]] = {}
        self._rows: pd.DataFrame | None = None
        self._warned: set[str] = set()

    def _warn_once(self, trainer: L.Trainer, key: str, msg: str, *args: Any, any_rank: bool = False) -> None:
        """Warn once per process; epoch-end warnings on rank 0 only, per-slide ones (``any_rank``)
        from whichever rank met the slide."""
        if key not in self._warned:
            self._warned.add(key)
            if any_rank or trainer.is_global_zero:
                log.warning(msg, *args)

    # ----------------------------------------------------------------- per batch
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records, self._lesions, self._rows = {}, {}, None

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = getattr(pl_module, "last_output", None)
        parts = self._applicable(out, batch) if out is not None else {}
        if not parts:
            return
        cases = getattr(batch, "slides", None) is not None  # patient-level bags: per slide
        for sid, rows in slide_parts(batch).items():  # {slide: [(row, its instances or None)]}
            if sid in self._records:
                continue
            lesions, status = self._lesions_of(trainer, sid)
            rec: dict[str, Any] = {"slide_id": sid, "annotation": status, "lesions": len(lesions)}
            if cases:
                rec["case_id"] = str(batch.slide_ids[rows[0][0]])
            for fn in parts.values():
                rec |= fn(trainer, out, batch, rows, sid, lesions)
            self._records[sid] = rec

    def _applicable(self, out: Any, batch: Any) -> dict[str, Any]:
        """{family: measuring function} for the families this output and batch allow."""
        mask = getattr(batch, "mask", None)
        n = None if mask is None or getattr(batch, "coords", None) is None else mask.shape[1]  # tiles a row
        tree, cross = getattr(out, "roi_tree", None), getattr(out, "cross_scale", None)
        levels, maps = getattr(batch, "levels", None), getattr(out, "tile_maps", None)
        found = {
            "roi": tree is not None,
            "recall": bool(levels and maps and len(maps) == len(levels) and all(m.index is not None for m in maps)),
            "cross_scale": n is not None and cross is not None and cross.ndim == 3 and cross.shape[1] == n,
            "localisation": n is not None and self._scores(out, n) is not None,
        }
        fns = {"roi": self._roi, "recall": self._recall, "cross_scale": self._cross_scale,
               "localisation": self._localisation}
        return {k: fns[k] for k in self.families if found[k]}

    def _scores(self, out: Any, n: int) -> torch.Tensor | None:
        """(B, N) tile scores: attention (map ``attention_map`` of (B, H, N)), else tile_scores."""
        att = getattr(out, "attention", None)
        if att is None:
            att = getattr(out, "tile_scores", None)
        if att is None or att.shape[-1] != n or att.ndim not in (2, 3):
            return None
        if att.ndim == 3:
            if not -att.shape[1] <= self.attention_map < att.shape[1]:
                return None
            att = att[:, self.attention_map]
        return att

    # ----------------------------------------------------------------- annotations
    def _lesions_of(self, trainer: L.Trainer, sid: str) -> tuple[list[Lesion], str]:
        """(lesions, status): status ``annotated | none | excluded | unreadable | no manifest``."""
        if sid in self._lesions:
            return self._lesions[sid]
        manifest = getattr(getattr(trainer, "datamodule", None), "manifest", None)
        if manifest is None:
            self._warn_once(trainer, "manifest", "mechanism: the datamodule (%s) has no manifest, so "
                            "no lesion annotations are found; lesion metrics are NaN",
                            type(getattr(trainer, "datamodule", None)).__name__)
            return [], "no manifest"
        if self._rows is None:
            self._rows = manifest.df.set_index("slide_id", drop=False)
        result: tuple[list[Lesion], str] = [], "none"
        if sid in self._rows.index:
            row = self._rows.loc[sid]
            path = find_annotation(row, Path(manifest.source))
            if _flag(row.get("exclude_localisation", False)):
                result = [], "excluded"
            elif path is not None and path.exists():
                try:
                    result = load_lesions(path), "annotated"
                except WSIError as e:
                    self._warn_once(trainer, f"read:{sid}", "mechanism: %s; slide '%s' is left out", e, sid,
                                    any_rank=True)
                    result = [], "unreadable"
        self._lesions[sid] = result
        return result

    def _extent(self, trainer: L.Trainer, sid: str) -> float | None:
        """Tile side in level-0 px from the feature store (None, warned once, when unknown)."""
        store = getattr(getattr(trainer, "datamodule", None), "store", None)
        ext, why = None, "the datamodule has no feature store"
        if store is not None:
            try:
                ext, why = store.attrs(sid).get("extent_level0"), "no attribute extent_level0"
            except (WSIError, OSError, KeyError) as e:
                why = f"{type(e).__name__}: {e}"
        if not ext:
            self._warn_once(trainer, "extent", "mechanism: no tile extent for slide '%s' (%s); the tile "
                            "metrics of such slides are skipped", sid, why, any_rank=True)
            return None
        return float(ext)

    # ----------------------------------------------------------------- families
    def _tiles(self, batch: Any, rows: list[tuple[int, torch.Tensor | None]],
               values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """A slide's valid tiles over its ``rows`` (``slide_parts``: row, and that slide's
        instances in it or None for all valid ones): (n, 2) unique level-0 coords and their
        values (n, ...) averaged over the rows (bags) they appear in."""
        idx = [b for b, _ in rows]
        mask = torch.stack([batch.mask[b] if sel is None else sel for b, sel in rows])  # (R, N)
        mask = mask.cpu().numpy().astype(bool)
        xy = batch.coords[idx].cpu().numpy()[mask]  # (M, 2)
        vals = values[idx].detach().float().cpu().numpy()[mask]  # (M, ...)
        if len(idx) == 1:
            return xy, vals
        uniq, inv = np.unique(xy, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        total = np.zeros((len(uniq), *vals.shape[1:]))
        np.add.at(total, inv, vals)
        counts = np.bincount(inv, minlength=len(uniq)).reshape(-1, *([1] * (vals.ndim - 1)))
        return uniq, total / counts

    def _labels(self, trainer: L.Trainer, sid: str, xy: np.ndarray, lesions: list[Lesion]) -> np.ndarray | None:
        if not lesions:
            return np.zeros(len(xy), dtype=bool)
        ext = self._extent(trainer, sid)
        return None if ext is None else tile_labels(xy, ext, lesions, self.tile_rule, self.min_overlap)

    def _localisation(self, trainer, out, batch, rows, sid, lesions) -> dict[str, Any]:
        xy, scores = self._tiles(batch, rows, self._scores(out, batch.mask.shape[1]))
        gt = self._labels(trainer, sid, xy, lesions)
        if gt is None:
            return {}
        if not lesions:  # normal slides: no ground truth to rank against, keep the count only
            return {"loc_auc": float("nan"), "tiles": len(gt), "lesion_tiles": 0}
        return mech.attention_record(scores, gt)

    def _cross_scale(self, trainer, out, batch, rows, sid, lesions) -> dict[str, Any]:
        xy, weights = self._tiles(batch, rows, out.cross_scale)  # (n, 2), (n, S)
        gt = self._labels(trainer, sid, xy, lesions)
        return {} if gt is None else mech.cross_scale_record(weights, gt)

    def _recall(self, trainer, out, batch, rows, sid, lesions) -> dict[str, Any]:
        b = rows[0][0]
        coords, scored = [], []
        for lv, m in zip(batch.levels, out.tile_maps, strict=True):
            valid = lv.mask[b].cpu().numpy().astype(bool)  # (N_l,) padded rows of the level
            coords.append(lv.coords[b].cpu().numpy()[valid])  # (n_l, 2)
            index = m.index[b].cpu().numpy()
            index = index[index >= 0]
            scored.append((np.cumsum(valid) - 1)[index[valid[index]]])  # padded row -> valid row
        extents = [float(lv.extent) for lv in batch.levels]
        return mech.cascade_record(coords, extents, scored, lesions, self.tile_rule, self.min_overlap)

    def _roi(self, trainer, out, batch, rows, sid, lesions) -> dict[str, Any]:
        b = rows[0][0]
        frames = [f[b].double().cpu().numpy() for f in out.roi_tree.frames]  # (N_d, 4)
        rec: dict[str, Any] = mech.roi_record(frames, lesions, self.grid)
        if lesions:
            rec |= self._chance(trainer, batch, b, sid, lesions)
        return rec

    def _chance(self, trainer: L.Trainer, batch: Any, b: int, sid: str, lesions: list[Lesion]) -> dict[str, Any]:
        """Lesion area / tissue area of the slide; the slide's area when no tissue mask is had."""
        from wsi_lightning.slides.reader import SlideReader
        from wsi_lightning.slides.tissue import segment_tissue

        path, mpp = self._slide_file(trainer, batch, b, sid)
        dims = getattr(batch, "dimensions", None)
        dims = None if dims is None else tuple(float(v) for v in dims[b])
        reason = "no slide path"
        if path is not None:
            try:
                with SlideReader(path, mpp=mpp) as reader:
                    dims = tuple(float(v) for v in reader.dimensions)
                    tissue = segment_tissue(reader, thumb_mpp=self.tissue_mpp)
                    frac = mech.lesion_area_fraction(tissue.mask, tissue.mpp / reader.mpp, lesions)
                    return {"lesion_area_fraction": frac, "area": "tissue"}
            except (WSIError, OSError) as e:
                reason = f"{type(e).__name__}: {e}"
        self._warn_once(trainer, "tissue", "mechanism: no tissue mask for slide '%s' (%s); the chance "
                        "level of such slides uses the slide area", sid, reason, any_rank=True)
        if dims is None:
            return {"lesion_area_fraction": float("nan"), "area": "none"}
        mask, px = mech.slide_mask(*dims)
        return {"lesion_area_fraction": mech.lesion_area_fraction(mask, px, lesions), "area": "slide"}

    def _slide_file(self, trainer: L.Trainer, batch: Any, b: int, sid: str) -> tuple[str | None, float | None]:
        paths, mpps = getattr(batch, "paths", None), getattr(batch, "mpp", None)
        if paths is not None:
            mpp = None if mpps is None or math.isnan(float(mpps[b])) else float(mpps[b])
            return str(paths[b]), mpp
        if self._rows is None or sid not in self._rows.index:
            return None, None
        row = self._rows.loc[sid]
        mpp = row.get("mpp", np.nan)
        return (str(row["path"]) or None), None if pd.isna(mpp) else float(mpp)  # "": no file given

    # ----------------------------------------------------------------- epoch end
    def _gather(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Every rank's records, each slide once, sorted by id (all ranks must call this)."""
        records = list(self._records.values())
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        by_id: dict[str, dict[str, Any]] = {}
        for r in records:
            by_id.setdefault(r["slide_id"], r)
        return [by_id[k] for k in sorted(by_id)]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self._gather(trainer)
        self._records, self._lesions = {}, {}
        if not trainer.is_global_zero or not records:
            return
        if not any(r["annotation"] == "annotated" for r in records):
            self._warn_once(trainer, "annotations", "mechanism: none of the %d test slides has a lesion "
                            "annotation (manifest column 'annotation' or <manifest folder>/annotations/"
                            "<slide_id>.geojson); no lesion metrics are logged", len(records))
            return
        metrics = mech.summarise(records)
        for k, v in metrics.items():
            pl_module.log(f"test/{k}", float(v), rank_zero_only=True)
        n_tumour = sum(r["lesions"] > 0 for r in records)
        on_slide = sum(r.get("area") in ("slide", "none") for r in records if r["lesions"] > 0)
        note = f"; chance level of {on_slide} slides on the slide area (no tissue mask)" if on_slide else ""
        log.info("mechanism: %d test slides, %d with lesions: %s%s", len(records), n_tumour,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "nothing applies", note)
        if self.write_csv:
            self._write(records, Path(trainer.default_root_dir) / CSV_NAME)

    @staticmethod
    def _write(records: list[dict[str, Any]], path: Path) -> None:
        """One row per slide (private ``_`` keys left out), written atomically."""
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, path)
