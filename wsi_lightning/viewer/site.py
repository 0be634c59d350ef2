"""``wsi view``: a static viewer folder of a fit or predict folder, opened from ``file://``.

Layout of the viewer folder (default ``<FOLDER>/viewer/``)::

    index.html, viewer.js, viewer.css   the page (package data of this module, copied)
    slides.js                           ``window.WSI_VIEWER = {...}``: the run, and per slide its
                                        predictions, the Deep Zoom tile source as an inline object,
                                        heat-map layers, top-k tiles and lesion outlines
    openseadragon/                      openseadragon.min.js, images/, LICENSE.txt (npm package)
    slides/<slide_id>/                  <slide_id>.dzi, <slide_id>_files/<level>/<col>_<row>.jpeg,
                                        meta.json (what the pyramid was made from)
    overlays/<slide_id>/<map>.png       heat-map layers: tile colours, transparent elsewhere

Nothing is fetched over the network and no server is needed: a ``file://`` page may load scripts
and images (OpenSeadragon draws tiles from ``<img>`` loads) but not read files with XHR, so
everything a ``.dzi`` file would tell OpenSeadragon is in ``slides.js``.

A slide's pyramid is written into a temporary folder and renamed into place when complete, so an
interrupted build leaves no half pyramid, and a rerun keeps every pyramid whose ``meta.json``
matches the slide file (size, modification time) and the tile settings. The heat-maps, the page
and ``slides.js`` are small and rewritten every time (each atomically).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from wsi_lightning.analysis import viz
from wsi_lightning.errors import ArgumentError, WSIError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.outputs import RunOutputs, load_outputs
from wsi_lightning.viewer import deepzoom
from wsi_lightning.viewer.assets import copy_openseadragon, find_openseadragon

log = logging.getLogger(__name__)

STATIC = ("index.html", "viewer.js", "viewer.css")
PYRAMID_VERSION = 1  # bump when the pyramid's pixels or layout change: older ones are rebuilt
LAYER_TILE_PX = 16  # heat-map layers: pixels per tile side (the browser smooths the edges over one)
OVERLAY_MAX_SIDE = 2048  # and at most this many pixels on the long side
MAX_RING_POINTS = 2000  # lesion outlines: vertices kept per ring (evenly thinned beyond)
CMAP = "jet"  # the attention logger's default colour map


@dataclass
class SlideResult:
    entry: dict[str, Any]
    built: bool  # a pyramid was written (False: reused, or the slide has no file)


def build_viewer(folder: str | Path, out: str | Path | None = None, slides: list[str] | None = None,
                 max_slides: int | None = None, top_k: int = 10) -> Path:
    """Build the viewer folder of a fit or predict folder (see the module docstring).

    Args:
        folder: ``runs/<exp>/<timestamp>`` or a ``wsi predict`` output folder.
        out: viewer folder (default ``<folder>/viewer``).
        slides: slide ids to show (default: every slide of the predictions).
        max_slides: at most this many slides (after ``slides``, in id order).
        top_k: most attended tiles marked per slide and map.

    Returns:
        The ``index.html`` written.

    Raises:
        WSIError: the folder is not a run, OpenSeadragon is not installed, or an unknown slide id
            is asked for (nothing is written in these cases).
    """
    if max_slides is not None and (isinstance(max_slides, bool) or max_slides < 1):
        raise ArgumentError(f"wsi view: --max-slides {max_slides!r}; expected a positive integer")
    if isinstance(top_k, bool) or top_k < 0:
        raise ArgumentError(f"wsi view: --top-k {top_k!r}; expected an integer >= 0")
    start = time.perf_counter()
    outs = load_outputs(folder)
    osd = find_openseadragon()  # before any work: a missing install fails at once
    ids = select_slides(outs, slides, max_slides)
    out = Path(out) if out is not None else outs.folder / "viewer"
    out.mkdir(parents=True, exist_ok=True)
    copy_openseadragon(osd, out / "openseadragon")
    for name in STATIC:
        _write_bytes(out / name, resources.files("wsi_lightning.viewer").joinpath("static", name).read_bytes())
    results = _build_slides(outs, ids, out, top_k)
    data = {"title": _title(outs), "folder": str(outs.folder.resolve()), "targets": list(outs.class_names),
            "normalisation": attention_normalisation(outs), "cmap": CMAP, "colorbar": _colorbar(CMAP),
            "openseadragon": osd.version, "slides": [r.entry for r in results]}
    _write_bytes(out / "slides.js", ("window.WSI_VIEWER = " + json.dumps(data, allow_nan=False) + ";\n").encode())
    n_built = sum(r.built for r in results)
    n_pix = sum(r.entry["tileSource"] is not None for r in results)
    log.info("wsi view: %d slide(s) (%d pyramid(s) built, %d reused, %d without a slide file) in %.1f s; "
             "open %s in a browser", len(results), n_built, n_pix - n_built, len(results) - n_pix,
             time.perf_counter() - start, (out / "index.html").resolve().as_uri())
    return out / "index.html"


def select_slides(outs: RunOutputs, slides: list[str] | None, max_slides: int | None) -> list[str]:
    """The slide ids to show, in id order; unknown ids fail naming them and the valid ones."""
    ids = outs.slide_ids
    if slides:
        unknown = [s for s in slides if s not in set(ids)]
        if unknown:
            shown = ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else "")
            raise WSIError(f"wsi view: slide(s) {unknown} are not in {outs.folder}'s predictions; "
                           f"its slides are: {shown}")
        ids = [s for s in ids if s in set(slides)]
    for sid in ids:
        safe_slide_id(sid, where=f"wsi view: {outs.folder}")  # ids name folders and files below
    return ids[:max_slides] if max_slides is not None else ids


def attention_normalisation(outs: RunOutputs) -> str:
    """The ``normalisation`` the run's attention logger wrote ``normalised`` with (its default,
    ``percentile``, when the config does not say)."""
    for cb in outs.cfg.get("callbacks") or []:
        if cb.get("name") == "attention_logger":
            return str(cb.get("normalisation") or "percentile")
    return "percentile"


# ----------------------------------------------------------------------------- slides
def _build_slides(outs: RunOutputs, ids: list[str], out: Path, top_k: int) -> list[SlideResult]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        overall = bar.add_task("wsi view: slides", total=len(ids))
        tiles = bar.add_task("", total=None, visible=False)
        for sid in ids:
            results.append(_slide(outs, sid, out, top_k, bar, tiles))
            bar.advance(overall)
    return results


def _slide(outs: RunOutputs, sid: str, out: Path, top_k: int, bar: Any, task: Any) -> SlideResult:
    """One slide's entry of ``slides.js``, its pyramid built (or reused) and its heat-maps drawn."""
    row = outs.slide_row(sid)
    entry: dict[str, Any] = {"id": sid, "targets": _predictions(outs, sid), "tileSource": None,
                             "width": None, "height": None, "mpp": None, "maps": [], "lesions": [], "note": ""}
    path = str(row.get("path") or "")
    if not path:
        entry["note"] = "no slide file in the manifest ('path' column): predictions only"
        return SlideResult(entry, False)
    if not Path(path).exists():
        entry["note"] = f"slide file {path} not found"
        log.warning("wsi view: %s: slide file %s not found; its predictions are listed without pixels", sid, path)
        return SlideResult(entry, False)
    mpp = None if pd.isna(row.get("mpp", np.nan)) else float(row["mpp"])
    geo, built = _pyramid(Path(path), mpp, sid, out / "slides", bar, task)
    url = f"slides/{quote(sid)}/{quote(sid)}_files/"
    entry.update(tileSource=geo.tile_source(url), width=geo.width, height=geo.height, mpp=mpp)
    entry["maps"] = _maps(outs, sid, geo, out / "overlays" / sid, top_k)
    entry["lesions"] = _lesions(row, outs.manifest.source)
    return SlideResult(entry, built)


def _predictions(outs: RunOutputs, sid: str) -> list[dict[str, Any]]:
    """Per target: label ("" when unknown), predicted class and its probability."""
    p = outs.predictions[outs.predictions["slide_id"] == sid].iloc[0]
    res = []
    for t, classes in outs.class_names.items():
        pre = "" if len(outs.class_names) == 1 else f"{t}_"
        label = p.get(f"{pre}label", "")
        pred = str(p.get(f"{pre}pred", ""))
        prob = p.get(f"{pre}prob_{pred}", np.nan)
        res.append({"target": t, "label": "" if pd.isna(label) else str(label), "pred": pred,
                    "prob": None if pd.isna(prob) else round(float(prob), 4),
                    "probs": {c: round(float(p[f"{pre}prob_{c}"]), 4) for c in classes
                              if not pd.isna(p.get(f"{pre}prob_{c}", np.nan))}})
    return res


def _source_stamp(path: Path) -> dict[str, Any]:
    """What identifies a slide's pixels: its resolved path, bytes and modification time (a
    folder, a DICOM WSI: its files')."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {"source": str(path.resolve()), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _pyramid(path: Path, mpp: float | None, sid: str, root: Path, bar: Any,
             task: Any) -> tuple[deepzoom.DeepZoomGeometry, bool]:
    """The slide's Deep Zoom pyramid under ``root/<sid>/``: reused when its ``meta.json`` matches,
    else written into ``root/.<sid>.tmp-<pid>/`` and renamed into place."""
    from wsi_lightning.slides import SlideReader

    final = root / sid
    want = {"version": PYRAMID_VERSION, **_source_stamp(path), "tile_size": deepzoom.TILE_SIZE,
            "overlap": deepzoom.OVERLAP, "format": deepzoom.FORMAT, "quality": deepzoom.QUALITY}
    try:
        have = json.loads((final / "meta.json").read_text())
    except (OSError, ValueError):
        have = None
    if have is not None and {k: have.get(k) for k in want} == want:
        return deepzoom.DeepZoomGeometry(have["width"], have["height"], have["tile_size"], have["overlap"]), False
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{sid}.tmp-*"):  # left by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{sid}.tmp-{os.getpid()}"

    def on_level(level: int, top: int, n: int) -> None:
        bar.reset(task, total=n, visible=True, description=f"  {sid}: level {level}/{top}")

    try:
        with SlideReader(path, mpp=mpp, tile_cache=64) as reader:
            geo = deepzoom.write_deep_zoom(reader, tmp, sid, on_level=on_level, on_tile=lambda: bar.advance(task))
        (tmp / "meta.json").write_text(json.dumps({**want, "width": geo.width, "height": geo.height}, indent=1))
        if final.exists():  # an outdated pyramid: out of the way first, then removed
            old = root / f".{sid}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.update(task, visible=False)
    return geo, True


# ----------------------------------------------------------------------------- heat-maps
def _maps(outs: RunOutputs, sid: str, geo: deepzoom.DeepZoomGeometry, folder: Path,
          top_k: int) -> list[dict[str, Any]]:
    """Per attention map of the slide: its layer PNG, where it lies, its colour scale and top-k."""
    tiles = outs.tiles(sid)
    if tiles.empty:
        return []
    mode = attention_normalisation(outs)
    names = list(dict.fromkeys(tiles["map"].astype(str)))
    res = []
    for i, name in enumerate(names):
        t = tiles[tiles["map"].astype(str) == name]
        extent = _extent(outs, sid, t)
        if extent is None:
            log.warning("wsi view: %s map %s: no tile extent in attention.csv or the feature store; "
                        "heat-map left out", sid, name)
            continue
        scale = layer_scale(geo, extent)
        shape = (int(np.ceil(geo.height * scale)), int(np.ceil(geo.width * scale)))
        norm = t["normalised"].to_numpy(np.float64)
        vmin, vmax = viz.display_range(norm, mode)
        xy = t[["x", "y"]].to_numpy(np.float64)
        rgba = viz.tile_rgba(viz.to_unit(norm, vmin, vmax), xy, extent, shape, scale, cmap=CMAP)
        _write_png(folder / f"{i}.png", rgba)
        order = np.argsort(-t["attention"].to_numpy(np.float64), kind="stable")[:top_k]
        top = [{"rank": r + 1, "tile": int(t["tile"].iloc[j]), "x": float(xy[j, 0]), "y": float(xy[j, 1]),
                "extent": extent, "attention": _num(t["attention"].iloc[j]), "normalised": _num(norm[j])}
               for r, j in enumerate(order)]
        res.append({"name": name, "label": _map_label(name, len(names)),
                    "overlay": f"overlays/{quote(sid)}/{i}.png",
                    "width": shape[1] / (scale * geo.width),  # in viewport units (slide width = 1)
                    "scale": scale,
                    "range": [vmin, vmax], "tiles": len(t), "topk": top})
    return res


def layer_scale(geo: deepzoom.DeepZoomGeometry, extent: float) -> float:
    """Heat-map layer pixels per level-0 pixel: LAYER_TILE_PX per tile, at most level 0's and
    OVERLAY_MAX_SIDE on the long side."""
    return min(1.0, LAYER_TILE_PX / extent, OVERLAY_MAX_SIDE / max(geo.width, geo.height))


def _extent(outs: RunOutputs, sid: str, tiles: pd.DataFrame) -> float | None:
    """Tile side in level-0 px: attention.csv's ``extent``, else the feature store's."""
    ext = tiles["extent"].dropna() if "extent" in tiles else pd.Series(dtype=float)
    if len(ext):
        return float(ext.iloc[0])
    if outs.store is not None:
        from wsi_lightning.features.store import FeatureStore

        try:
            value = FeatureStore(outs.store).attrs(sid).get("extent_level0")
            return float(value) if value else None
        except (WSIError, OSError, KeyError):
            return None
    return None


def _num(v: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    v = float(v)
    return v if np.isfinite(v) else None


def _map_label(name: str, n: int) -> str:
    if n == 1 and name == "0":
        return "attention"
    return f"map {name}" if name.isdigit() else name


def _colorbar(cmap: str, stops: int = 11) -> str:
    """A CSS linear-gradient of ``cmap`` (the heat-map legend)."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    cols = [f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f}) {100 * i / (stops - 1):.0f}%"
            for i, (r, g, b, _) in enumerate(cm(np.linspace(0, 1, stops)))]
    return f"linear-gradient(to right, {', '.join(cols)})"


def _lesions(row: pd.Series, manifest_source: Path) -> list[list[list[float]]]:
    """Lesion exteriors in level-0 px, rings thinned to at most MAX_RING_POINTS vertices."""
    from wsi_lightning.slides.annotations import lesion_outlines

    rings = []
    for ring in lesion_outlines(row, manifest_source, "wsi view"):
        step = max(1, -(-len(ring) // MAX_RING_POINTS))
        rings.append(np.round(ring[::step], 1).tolist())
    return rings


# ----------------------------------------------------------------------------- files
def _title(outs: RunOutputs) -> str:
    method = outs.cfg.get("method", {}).get("name", "")
    return f"{method} · {outs.folder.parent.name}/{outs.folder.name}" if method else outs.folder.name


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(path: Path, rgba: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(rgba, "RGBA").save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
