"""``wsi export-qupath``: a run's tile maps and slide predictions as QuPath GeoJSON, one file per slide.

For a fit folder (``runs/<exp>/<timestamp>``) or a ``wsi predict`` folder
(:func:`wsi_lightning.outputs.load_outputs`), every predicted slide gets
``<out>/<slide_id>.geojson`` (default ``<folder>/qupath/``), written atomically: a GeoJSON
FeatureCollection (RFC 7946) in level-0 pixels, as QuPath writes and reads it (its
``PathObjectTypeAdapters``: ``properties.objectType``, ``classification {name, color}``,
``measurements`` a flat {name: number} map, as since QuPath 0.4):

* one **detection** per tile of ``attention/attention.csv`` (a square of the tile's ``extent``
  at its ``x, y``), classified as the slide's predicted class, with the measurements
  ``attention`` and ``attention (normalised)`` (methods without attention, e.g. CHOWDER, log
  their tile scores there: see the attention logger). With several maps on the same tiles
  (heads, CS-MIL's scales) each map has its own pair, ``attention map <m>`` /
  ``attention map <m> (normalised)`` (``<m>`` as in the CSV's ``map`` column; a named map, e.g. a
  HAG-MIL level, is ``attention <name>``); maps of their own geometry (HAG-MIL's levels) give
  their own detections. Feature attribution (``attribution/tiles.csv``), when it was run, adds
  ``tile score``, ``H`` and ``H oriented`` to the tiles it covers. ``--map`` keeps one map
  (then named plain ``attention``).
* the **tissue outline** as one annotation classified ``Tissue``: the slide's tissue mask
  (:func:`~wsi_lightning.slides.tissue.segment_tissue` at the run's ``tiling.thumb_mpp``,
  restricted to the manifest row's ``roi`` when it has one) as a simplified polygon. It carries
  the slide-level prediction: ``name`` says it, ``measurements`` hold ``prob <class>`` for every
  class and the predicted class index, ``metadata`` the slide id, prediction and label. Without
  the slide file (features imported without slides) the outline is skipped, with one warning,
  and the tiles are still written (an unreadable slide likewise, warned by name).

Measurement values are finite numbers (JSON has no NaN; a missing value is left out). Our own
reader (:mod:`wsi_lightning.slides.annotations`) skips the detections and does not take
``Tissue`` for a lesion, so an exported file can sit beside the lesion annotations. In QuPath:
open the slide, then File > Import objects (or drag the .geojson onto the viewer).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_lightning.errors import WSIError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.outputs import RunOutputs, load_outputs

log = logging.getLogger(__name__)

TISSUE_CLASS = "Tissue"
TISSUE_COLOR = [80, 160, 90]
ATTRIBUTION_MEASUREMENTS = {"tile_score": "tile score", "H": "H", "H_oriented": "H oriented"}
_PALETTE = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189],
            [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]  # tab10
_NAMESPACE = uuid.UUID("5b0f3f2e-7a51-4c47-9d8e-2f1f4b7a0c11")  # stable object ids across exports


def export_qupath(folder: str | Path, out: str | Path | None = None, map_name: str | None = None) -> list[Path]:
    """Write one QuPath GeoJSON per predicted slide of a fit or predict folder.

    Args:
        folder: the run folder (see :func:`~wsi_lightning.outputs.load_outputs`).
        out: output folder (default ``<folder>/qupath``).
        map_name: export this attention map only (a value of ``attention.csv``'s ``map`` column).

    Returns:
        The files written, one per slide, sorted by slide id.

    Raises:
        WSIError: not a run folder, an unknown ``map_name``, a slide id that is not a safe file
            name, or tiles whose extent neither ``attention.csv`` nor the feature store records.
    """
    from rich.progress import track

    outputs = load_outputs(folder)
    out = Path(out) if out is not None else outputs.folder / "qupath"
    maps = _check_map(outputs, map_name)
    if outputs.attention is None:
        log.warning("export-qupath: %s has no %s (the run logged no tile maps: attention_logger callback); "
                    "only the tissue outlines and slide predictions are written", outputs.folder,
                    Path("attention") / "attention.csv")
    out.mkdir(parents=True, exist_ok=True)
    warned: set[str] = set()
    written = []
    for sid in track(outputs.slide_ids, description="QuPath GeoJSON", transient=True,
                     disable=len(outputs.slide_ids) < 4):
        safe_slide_id(sid, where=f"export-qupath into {out}")
        collection = slide_collection(outputs, sid, maps, warned)
        written.append(_write_json(out / f"{sid}.geojson", collection))
    n_tiles = sum(len(outputs.tiles(s)) for s in outputs.slide_ids) if outputs.attention is not None else 0
    log.info("export-qupath: %d slide(s) -> %s (%d attention rows); in QuPath open the slide, then "
             "File > Import objects", len(written), out, n_tiles)
    return written


def slide_collection(outputs: RunOutputs, slide_id: str, maps: list[str] | None = None,
                     warned: set[str] | None = None) -> dict[str, Any]:
    """The FeatureCollection of one slide: its tile detections and its tissue annotation."""
    warned = set() if warned is None else warned
    pred = outputs.predictions[outputs.predictions["slide_id"].astype(str) == slide_id].iloc[0]
    target = next(iter(outputs.class_names))
    names = outputs.class_names[target]
    pre = "" if len(outputs.class_names) == 1 else f"{target}_"
    cls = str(pred[f"{pre}pred"])
    color = _PALETTE[names.index(cls) % len(_PALETTE)] if cls in names else _PALETTE[-1]
    tiles = outputs.tiles(slide_id)
    if maps is not None:
        tiles = tiles[tiles["map"].astype(str).isin(maps)]
    features = tile_detections(tiles, slide_id, {"name": cls, "color": color}, _attribution(outputs, slide_id),
                               _store_extent(outputs, slide_id) if tiles["extent"].isna().any() else None)
    outline = tissue_outline(outputs, slide_id, warned)
    if outline is not None:
        features.append(tissue_annotation(outline, slide_id, pred, outputs.class_names))
    return {"type": "FeatureCollection", "features": features}


def tile_detections(tiles: pd.DataFrame, slide_id: str, classification: dict[str, Any],
                    attribution: pd.DataFrame | None = None, extent: float | None = None) -> list[dict[str, Any]]:
    """One detection per tile (x, y, extent) of a slide's ``attention.csv`` rows.

    Args:
        tiles: the slide's rows (``map, tile, x, y, extent, attention, normalised``), any maps.
        classification: QuPath classification of every tile (the slide's predicted class).
        attribution: the slide's ``attribution/tiles.csv`` rows, joined on (x, y), or None.
        extent: tile side for rows whose ``extent`` is empty (the store's ``extent_level0``).
    """
    if tiles.empty:
        return []
    tiles = tiles.copy()
    if tiles["extent"].isna().any():
        if not extent:
            raise WSIError(f"export-qupath: slide '{slide_id}': attention.csv gives no tile extent and the "
                           "feature store records none (extent_level0), so the tiles cannot be placed")
        tiles["extent"] = tiles["extent"].fillna(float(extent))
    map_ids = list(dict.fromkeys(tiles["map"].astype(str)))
    label = {m: _measure_name(m, len(map_ids)) for m in map_ids}
    attr = {}
    if attribution is not None and not attribution.empty:
        cols = [c for c in ATTRIBUTION_MEASUREMENTS if c in attribution.columns]
        attr = {(int(r.x), int(r.y)): {ATTRIBUTION_MEASUREMENTS[c]: getattr(r, c) for c in cols}
                for r in attribution.itertuples(index=False)}
    by_tile: dict[tuple[int, int, float], dict[str, Any]] = {}  # one entry per tile, in CSV order
    for r in tiles.itertuples(index=False):
        m = by_tile.setdefault((int(r.x), int(r.y), float(r.extent)), {})
        name = label[str(r.map)]
        m[name], m[f"{name} (normalised)"] = r.attention, r.normalised
    out = []
    for (x, y, e), m in by_tile.items():
        m.update(attr.get((x, y), {}))
        x1, y1 = (x + e, y + e) if not e.is_integer() else (x + int(e), y + int(e))
        out.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{slide_id}/{x}/{y}/{e:g}")),
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {"objectType": "detection", "classification": classification,
                           "measurements": _finite(m)},
        })
    return out


def tissue_annotation(geom: Any, slide_id: str, pred: pd.Series, class_names: dict[str, list[str]]) -> dict[str, Any]:
    """The tissue outline as a QuPath annotation carrying the slide-level prediction."""
    from wsi_lightning.slides.regions import geojson_geometry

    several = len(class_names) > 1
    measurements: dict[str, float] = {}
    meta = {"slide_id": slide_id}
    summary = []
    for t, names in class_names.items():
        pre, head = (f"{t}_", f"{t} ") if several else ("", "")
        p = str(pred[f"{pre}pred"])
        for c in names:
            measurements[f"{head}prob {c}"] = pred.get(f"{pre}prob_{c}")
        if p in names:
            measurements[f"{head}predicted class index"] = float(names.index(p))
        meta[f"{pre}prediction"] = p
        label = pred.get(f"{pre}label")
        if isinstance(label, str) and label:
            meta[f"{pre}label"] = label
        prob = pred.get(f"{pre}prob_{p}")
        summary.append(f"{head}{p}" + (f" ({float(prob):.3f})" if _is_number(prob) else ""))
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, f"{slide_id}/tissue")),
        "geometry": geojson_geometry(geom),
        "properties": {"objectType": "annotation", "name": "prediction: " + ", ".join(summary),
                       "classification": {"name": TISSUE_CLASS, "color": TISSUE_COLOR},
                       "measurements": _finite(measurements), "metadata": meta},
    }


def tissue_outline(outputs: RunOutputs, slide_id: str, warned: set[str]) -> Any | None:
    """The slide's tissue (inside its ROI, if any) as a level-0 (Multi)Polygon; None, with one
    warning per export, when the slide file is not there."""
    from wsi_lightning.slides import SlideReader, segment_tissue
    from wsi_lightning.slides.regions import apply_roi, mask_polygons

    row = outputs.slide_row(slide_id)
    path = str(row.get("path") or "")
    if not path or not Path(path).exists():
        if "slide" not in warned:
            warned.add("slide")
            log.warning("export-qupath: slide '%s' has no slide file (%s), so its tissue outline (and the "
                        "slide-level prediction it carries) is skipped; its tiles are written. Slides "
                        "without files are skipped the same way, without another warning",
                        slide_id, path or "no path in the manifest")
        return None
    mpp = None if pd.isna(row.get("mpp", np.nan)) else float(row["mpp"])
    try:
        with SlideReader(path, mpp=mpp) as reader:
            tissue = segment_tissue(reader, thumb_mpp=float(outputs.cfg.tiling.thumb_mpp))
            roi = row.get("roi")
            if isinstance(roi, str) and roi:
                try:
                    tissue = apply_roi(tissue, roi, reader.dimensions, reader.mpp, f"slide '{slide_id}'")
                except WSIError as e:  # the ROI changed or went away since the run: outline all tissue
                    log.warning("export-qupath: %s; the outline of '%s' is all its tissue", e, slide_id)
            return mask_polygons(tissue.mask, tissue.mpp / reader.mpp, simplify=1.0)
    except WSIError as e:  # an unreadable slide, or no tissue found: its tiles still go out
        log.warning("export-qupath: %s; no tissue outline for '%s', its tiles are written", e, slide_id)
        return None


def _check_map(outputs: RunOutputs, map_name: str | None) -> list[str] | None:
    if map_name is None:
        return None
    found = [] if outputs.attention is None else list(dict.fromkeys(outputs.attention["map"].astype(str)))
    if str(map_name) not in found:
        raise WSIError(f"export-qupath: --map {map_name!r} is not in {outputs.folder / 'attention' / 'attention.csv'}; "
                       f"its maps: {found or 'none (no attention.csv)'}")
    return [str(map_name)]


def _measure_name(map_id: str, n_maps: int) -> str:
    """``attention`` for a single map, ``attention map <m>`` / ``attention <name>`` for several."""
    if n_maps == 1:
        return "attention"
    return f"attention map {map_id}" if map_id.lstrip("-").isdigit() else f"attention {map_id}"


def _attribution(outputs: RunOutputs, slide_id: str) -> pd.DataFrame | None:
    a = outputs.attribution
    return None if a is None else a[a["slide_id"].astype(str) == slide_id]


def _store_extent(outputs: RunOutputs, slide_id: str) -> float | None:
    from wsi_lightning.features.store import FeatureStore

    if outputs.store is None:
        return None
    try:
        ext = FeatureStore(outputs.store).attrs(slide_id).get("extent_level0")
    except (WSIError, OSError, KeyError):
        return None
    return float(ext) if ext else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and bool(np.isfinite(v))


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """The measurements as plain floats, leaving out missing and non-finite values."""
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` to ``path`` atomically (a temporary file in the same folder, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, allow_nan=False, separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
