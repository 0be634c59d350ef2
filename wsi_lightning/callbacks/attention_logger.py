"""Attention heat-maps, top/bottom tile montages and a per-tile CSV for every test slide.

For any method whose ``MILOutput.attention`` is set ((B, N), or (B, H, N) for H maps; methods
without attention, such as CHOWDER, give their ``MILOutput.tile_scores`` (B, N) instead), the
callback keeps each test slide's attention over its valid tiles and their level-0 coordinates.
At the end of the test epoch the slides of all ranks are gathered (each slide once) and rank 0
writes, under ``<run folder>/<out_dir>/``:

    attention.csv                 slide_id, map, tile, x, y, extent, attention (raw), normalised
    <slide_id>_heatmap.png        thumbnail | heat-map (annotated lesions outlined if found)
    <slide_id>_topk.png           the top_k most attended tiles, read from the slide
    <slide_id>_bottomk.png        the bottom_k least attended tiles
    (with H > 1 maps: <slide_id>_map<h>_heatmap.png, ... one set per map)

``tile`` is the tile's row in the feature store (test bags are never subsampled), except with
test-time bag sampling (CS-MIL): a slide's sampled bags are merged, one value per sampled
location (its mean over the bags), and ``tile`` indexes those locations. Methods that return
cross-scale scores (``MILOutput.cross_scale``, (B, N, S)) get S more maps after the instance
attention: map 1 + s is scale s's score (CS-MIL's Fig. 3 paints each scale min-max normalised:
``normalisation: minmax``). Methods that score other tile sets (HAG-MIL's quadtree levels) return
them as ``MILOutput.tile_maps`` (:class:`~wsi_lightning.methods.base.TileMap`: name, attention
(B, n), mask (B, n), coords (B, n, 2), extent, the tiles' side in level-0 px); each becomes a map of its own, named
``<slide_id>_<name>_heatmap.png`` and ``map = <name>`` in the CSV. ``x, y`` are a tile's top-left
corner and ``extent`` its side, in level-0 pixels (empty when the store does not record it), so
the CSV alone places every tile on the slide (``wsi export-qupath``, ``wsi view``).

Patient-level bags (``data.bag_level=case``: one bag per case, ``Bag.slides`` / ``slide_index``)
are split back into their slides: one entry per slide, so ``attention.csv`` has each slide's
rows under its own ``slide_id`` (``tile`` its row in the store, ``x, y`` in its own frame), a
``case_id`` column names the bag, and heat-maps and montages are drawn per slide. ``attention``
is the raw value, which sums to 1 over the whole case; ``normalised`` (and the heat-maps'
colour scale) is computed over the case's tiles, so the slides of a case compare (a slide
without evidence stays cold beside the one that has it). Images need
the slide files (manifest ``path`` and ``mpp``) and the feature store's tile geometry; without
them (features imported without slides) the images are skipped with one warning and the CSV
is still written. Lesion outlines come from a manifest column ``annotation`` (a GeoJSON path,
relative to the manifest's folder) or ``<manifest folder>/annotations/<slide_id>.geojson``.
See :mod:`wsi_lightning.analysis.viz` for the normalisations.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from wsi_lightning.analysis import viz
from wsi_lightning.data.batch import slide_parts
from wsi_lightning.errors import ArgumentError, WSIError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.methods.base import TileMap
from wsi_lightning.registry import CALLBACKS

log = logging.getLogger(__name__)

CSV_NAME = "attention.csv"


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or null" if allow_none else ""
        raise ArgumentError(f"attention_logger: {name}={value!r}; expected an integer >= {minimum}{extra}")


def _merge_bags(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Several sampled bags of one slide (test-time bag sampling): one value per tile location,
    the mean over the bags (and repeats) it appeared in."""
    if len(entries) == 1:
        return entries[0]
    xy = np.concatenate([e["coords"] for e in entries])  # (M, 2)
    att = np.concatenate([e["attention"] for e in entries], 1)  # (H, M)
    uniq, inv = np.unique(xy, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    total = np.zeros((att.shape[0], len(uniq)))
    np.add.at(total, (slice(None), inv), att)
    counts = np.bincount(inv, minlength=len(uniq))
    return {**entries[0], "attention": total / counts, "coords": uniq.astype(np.int64)}


@CALLBACKS.register("attention_logger")
class AttentionLogger(L.Callback):
    """Write attention heat-maps, tile montages and ``attention.csv`` after testing.

    Args:
        normalisation: how heat-map values are normalised per slide: ``raw | softmax |
            minmax | percentile`` (see :mod:`wsi_lightning.analysis.viz`).
        top_k: most attended tiles in the ``_topk.png`` montage (0: no montage).
        bottom_k: least attended tiles in the ``_bottomk.png`` montage (0: no montage).
        max_slides: render images for at most this many test slides (sorted by id); null
            renders all. ``attention.csv`` always holds every slide.
        thumb_max_size: longest side of the slide thumbnail in pixels.
        out_dir: output folder, relative to the run folder (``trainer.default_root_dir``).
        log_images: send the heat-maps and montages to an attached W&B logger.
        wandb_max_slides: at most this many slides are sent to W&B.
        cmap: matplotlib colormap of the heat-map.
        alpha: opacity of the heat-map over the thumbnail, in [0, 1].
        montage_cols: tiles per row in the montages.
        annotations: outline annotated lesions (GeoJSON) on the heat-map when available.
    """

    def __init__(
        self,
        normalisation: str = "percentile",
        top_k: int = 8,
        bottom_k: int = 8,
        max_slides: int | None = None,
        thumb_max_size: int = 1024,
        out_dir: str = "attention",
        log_images: bool = True,
        wandb_max_slides: int = 8,
        cmap: str = "jet",
        alpha: float = 0.5,
        montage_cols: int = 8,
        annotations: bool = True,
    ) -> None:
        import matplotlib

        if normalisation not in viz.NORMALISATIONS:
            raise ArgumentError(f"attention_logger: normalisation={normalisation!r}; expected one of "
                             f"{list(viz.NORMALISATIONS)}")
        _check_int("top_k", top_k, 0)
        _check_int("bottom_k", bottom_k, 0)
        _check_int("max_slides", max_slides, 0, allow_none=True)
        _check_int("thumb_max_size", thumb_max_size, 16)
        _check_int("wandb_max_slides", wandb_max_slides, 0)
        _check_int("montage_cols", montage_cols, 1)
        if not isinstance(out_dir, str | os.PathLike) or not str(out_dir).strip():
            raise ArgumentError(f"attention_logger: out_dir={out_dir!r}; expected a non-empty folder name")
        for name, flag in (("log_images", log_images), ("annotations", annotations)):
            if not isinstance(flag, bool):
                raise ArgumentError(f"attention_logger: {name}={flag!r}; expected true or false")
        if cmap not in matplotlib.colormaps:
            raise ArgumentError(f"attention_logger: cmap={cmap!r} is not a matplotlib colormap; "
                             "e.g. 'jet', 'viridis', 'inferno', 'coolwarm'")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            raise ArgumentError(f"attention_logger: alpha={alpha!r}; expected a number in [0, 1]")
        self.normalisation, self.top_k, self.bottom_k = normalisation, top_k, bottom_k
        self.max_slides, self.thumb_max_size, self.out_dir = max_slides, thumb_max_size, str(out_dir)
        self.log_images, self.wandb_max_slides = log_images, wandb_max_slides
        self.cmap, self.alpha, self.montage_cols = cmap, float(alpha), montage_cols
        self.annotations = annotations
        self._slides: list[dict[str, Any]] = []
        self._warned: set[str] = set()

    # ----------------------------------------------------------------- collection
    def _warn_once(self, trainer: L.Trainer, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if trainer.is_global_zero:
                log.warning(msg, *args)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._slides = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = getattr(pl_module, "last_output", None)
        att = getattr(out, "attention", None)
        maps = getattr(out, "tile_maps", None)
        if maps:
            self._keep_maps(batch, maps)
            return
        if att is None:  # methods without attention (CHOWDER): their tile scores are the map
            att = getattr(out, "tile_scores", None)
        if att is None:
            self._warn_once(trainer, "none", "attention_logger: %s gives no attention and no tile "
                            "scores (MILOutput.attention / tile_scores are None); no maps are written",
                            type(pl_module).__name__)
            return
        mask, coords = getattr(batch, "mask", None), getattr(batch, "coords", None)
        att = att[:, None] if att.ndim == 2 else att  # (B, H, N)
        if mask is None or coords is None or att.ndim != 3 or att.shape[-1] != mask.shape[1]:
            self._warn_once(trainer, "shape", "attention_logger: attention of shape %s does not "
                            "match the batch (expected (B, N) or (B, H, N) with a Bag's mask); "
                            "skipped", tuple(att.shape))
            return
        cross = getattr(out, "cross_scale", None)  # CS-MIL: (B, N, S)
        if cross is not None and cross.shape[:2] == att.shape[::2]:
            att = torch.cat([att, cross.detach().float().transpose(1, 2)], 1)  # (B, 1 + S, N)
        att = att.detach().float().cpu().numpy()
        mask, coords = mask.cpu().numpy().astype(bool), coords.cpu().numpy()
        cases = getattr(batch, "slides", None) is not None  # patient-level bags: split per slide
        for sid, rows in slide_parts(batch).items():
            for b, sel in rows:
                keep = mask[b] if sel is None else sel.cpu().numpy().astype(bool)  # (N,)
                entry = {"slide_id": sid, "attention": att[b][:, keep],  # (H, n)
                         "coords": coords[b][keep].astype(np.int64)}  # (n, 2)
                self._slides.append({**entry, "case_id": str(batch.slide_ids[b])} if cases else entry)

    def _keep_maps(self, batch: Any, maps: list[TileMap]) -> None:
        """Named tile sets of their own geometry (``MILOutput.tile_maps``), one entry per slide and map."""
        if getattr(batch, "slides", None) is not None:  # no slide index in a TileMap
            log.warning("attention_logger: tile maps (MILOutput.tile_maps) of patient-level bags cannot "
                        "be split by slide; skipped")
            return
        for m in maps:
            att = m.attention.detach().float().cpu().numpy()  # (B, n)
            mask = m.mask.cpu().numpy().astype(bool)
            coords = m.coords.cpu().numpy()
            for b, sid in enumerate(batch.slide_ids):
                self._slides.append({"slide_id": str(sid), "map": str(m.name), "extent": int(m.extent),
                                     "attention": att[b][mask[b]][None], "coords": coords[b][mask[b]].astype(np.int64)})

    def _gather(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Every rank's slides, each slide once, sorted by id (all ranks must call this)."""
        slides = self._slides
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, slides)
            slides = [s for part in parts for s in part]
        by_slide: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for s in slides:
            by_slide.setdefault((s["slide_id"], s.get("map", "")), []).append(s)
        return [_merge_bags(by_slide[k]) for k in sorted(by_slide)]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        slides = self._gather(trainer)
        self._slides = []
        if not trainer.is_global_zero or not slides:
            return
        out = Path(trainer.default_root_dir) / self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.normalise(slides)
        store = getattr(trainer.datamodule, "store", None)
        for s in slides:
            if not s.get("extent") and store is not None:
                try:
                    s["extent"] = store.attrs(s["slide_id"]).get("extent_level0")
                except (WSIError, OSError, KeyError):
                    s["extent"] = None
        self.write_csv(slides, out / CSV_NAME)
        keep = list(dict.fromkeys(s["slide_id"] for s in slides))[: self.max_slides]  # slides, not maps
        todo = slides if self.max_slides is None else [s for s in slides if s["slide_id"] in set(keep)]
        images = self._render_all(trainer, todo, out) if todo else {}
        log.info("attention_logger: %d slides in %s; images for %d in %s", len({s["slide_id"] for s in slides}),
                 out / CSV_NAME, len(images), out)
        if images and self.log_images:
            self._log_wandb(trainer, images)

    # ----------------------------------------------------------------- normalisation
    def normalise(self, slides: list[dict[str, Any]]) -> None:
        """Set each entry's ``normalised`` (H, n) values and their colour range ``vrange`` (one
        ``(vmin, vmax)`` per map), over the entry's slide, or over its whole case for
        patient-level bags (the entries sharing a ``case_id`` and map)."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for s in slides:
            groups.setdefault((s.get("case_id", s["slide_id"]), str(s.get("map", ""))), []).append(s)
        for group in groups.values():
            att = np.concatenate([s["attention"] for s in group], 1)  # (H, sum n)
            norm = np.stack([viz.normalise(a, self.normalisation) for a in att])  # (H, sum n)
            ranges = [viz.display_range(v, self.normalisation) for v in norm]
            start = 0
            for s in group:
                n = s["attention"].shape[1]
                s["normalised"], s["vrange"] = norm[:, start : start + n], ranges
                start += n

    # ----------------------------------------------------------------- CSV
    def write_csv(self, slides: list[dict[str, Any]], path: Path) -> None:
        """One row per (slide, map, tile), written atomically (with a ``case_id`` column for
        patient-level bags)."""
        if any("normalised" not in s for s in slides):
            self.normalise(slides)
        cases = any("case_id" in s for s in slides)
        parts = []
        for s in slides:
            att, xy = s["attention"], s["coords"]  # (H, n), (n, 2)
            for h in range(att.shape[0]):
                ids = {"slide_id": s["slide_id"], **({"case_id": s.get("case_id", "")} if cases else {})}
                parts.append(pd.DataFrame({
                    **ids, "map": s.get("map", h), "tile": np.arange(att.shape[1]),
                    "x": xy[:, 0], "y": xy[:, 1],
                    "extent": float(s["extent"]) if s.get("extent") else np.nan, "attention": att[h],
                    "normalised": s["normalised"][h]}))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pd.concat(parts, ignore_index=True).to_csv(tmp, index=False)
        os.replace(tmp, path)

    # ----------------------------------------------------------------- images
    def _render_all(self, trainer: L.Trainer, slides: list[dict[str, Any]],
                    out: Path) -> dict[str, dict[str, list[Path]]]:
        """Render every slide; returns {slide_id: {"heatmap": [...], "topk": [...], ...}}."""
        from rich.progress import Progress

        dm = trainer.datamodule
        manifest, store = getattr(dm, "manifest", None), getattr(dm, "store", None)
        if manifest is None or store is None:
            log.warning("attention_logger: the datamodule (%s) has no manifest/feature store, so "
                        "slide images cannot be read; heat-maps skipped, %s written",
                        type(dm).__name__, CSV_NAME)
            return {}
        rows = manifest.df.set_index("slide_id")
        done: dict[str, dict[str, list[Path]]] = {}
        failed: list[tuple[str, str]] = []
        show = trainer.progress_bar_callback is not None and len(slides) > 3
        with Progress(transient=True, disable=not show) as bar:
            task = bar.add_task("attention maps", total=len(slides))
            for s in slides:
                try:
                    paths = self._render_slide(s, rows, manifest.source, store, out)
                    prev = done.setdefault(s["slide_id"], {k: [] for k in paths})
                    for k, v in paths.items():
                        prev[k].extend(v)
                except (WSIError, OSError, KeyError, ValueError) as e:
                    failed.append((s["slide_id"], f"{type(e).__name__}: {e}"))
                bar.advance(task)
        if failed:
            log.warning("attention_logger: no images for %d of %d slides (slide files or tile "
                        "geometry unavailable; first: %s: %s); %s has every slide", len(failed),
                        len(slides), failed[0][0], failed[0][1], CSV_NAME)
        return done

    def _render_slide(self, s: dict[str, Any], rows: pd.DataFrame, manifest_path: Path,
                      store: Any, out: Path) -> dict[str, list[Path]]:
        from wsi_lightning.slides import SlideReader

        sid, att, xy = s["slide_id"], s["attention"], s["coords"]  # (H, n), (n, 2)
        safe_slide_id(sid, where=f"attention_logger: images in {out}")  # ids name the files below
        if "normalised" not in s:
            self.normalise([s])
        row = rows.loc[sid]
        attrs = store.attrs(sid)
        extent = s.get("extent") or attrs.get("extent_level0")
        if s.get("extent") and attrs.get("mpp") and attrs.get("extent_level0"):  # a map at its own scale
            attrs = {**attrs, "mpp": float(attrs["mpp"]) * s["extent"] / float(attrs["extent_level0"])}
        if not extent:
            raise ValueError(f"feature store has no extent_level0 for slide '{sid}'")
        mpp = None if pd.isna(row.get("mpp", np.nan)) else float(row["mpp"])
        polygons = self._polygons(sid, row, manifest_path) if self.annotations else []
        paths: dict[str, list[Path]] = {"heatmap": [], "topk": [], "bottomk": []}
        if not row["path"]:
            raise ValueError("the manifest gives no slide path ('path' column), so there are no "
                             "pixels to draw on")
        with SlideReader(row["path"], mpp=mpp) as reader:
            thumb, thumb_mpp = reader.thumbnail(max_size=self.thumb_max_size)
            scale = reader.mpp / thumb_mpp  # thumbnail px per level-0 px
            tiles: dict[int, np.ndarray] = {}
            for h in range(att.shape[0]):
                stem = (f"{sid}_{s['map']}" if s.get("map") else sid if att.shape[0] == 1 else f"{sid}_map{h}")
                norm, (vmin, vmax) = s["normalised"][h], s["vrange"][h]  # over the slide, or its case
                overlay = viz.tile_heatmap(viz.to_unit(norm, vmin, vmax), xy, float(extent), thumb,
                                           scale, cmap=self.cmap, alpha=self.alpha)
                name = f" {s['map']}" if s.get("map") else "" if att.shape[0] == 1 else f" map{h}"
                case = f", case {s['case_id']}" if s.get("case_id") else ""
                title = f"{sid}{name} ({len(xy)} tiles{case})"
                paths["heatmap"].append(viz.save_heatmap_figure(
                    out / f"{stem}_heatmap.png", thumb, overlay, title,
                    f"attention ({self.normalisation})", vmin, vmax, self.cmap, polygons, scale))
                order = np.argsort(-att[h], kind="stable")
                for kind, k, idx in (("topk", self.top_k, order), ("bottomk", self.bottom_k, order[::-1])):
                    if k:
                        paths[kind].append(self._montage(reader, attrs, tiles, idx[:k], att[h], norm,
                                                         xy, out / f"{stem}_{kind}.png", f"{sid} {kind}"))
        return paths

    def _montage(self, reader: Any, attrs: dict[str, Any], cache: dict[int, np.ndarray],
                 idx: np.ndarray, att: np.ndarray, norm: np.ndarray, xy: np.ndarray,
                 path: Path, title: str) -> Path:
        """Tiles ``idx`` read as the backbone saw them (store mpp / tile size), captioned."""
        size, mpp = attrs.get("tile_size"), attrs.get("mpp")
        if not size or not mpp:  # unknown read geometry: level-0 pixels of the tile's extent
            size, mpp = int(attrs["extent_level0"]), reader.mpp
        for i in idx:
            if int(i) not in cache:
                x, y = (int(v) for v in xy[i])
                cache[int(i)] = reader.read_at_mpp((x, y), (int(size), int(size)), float(mpp))
        labels = [f"#{r + 1} tile {int(i)}\na={att[i]:.3g} n={norm[i]:.3g}" for r, i in enumerate(idx)]
        return viz.tile_montage([cache[int(i)] for i in idx], labels, self.montage_cols, path, title)

    def _polygons(self, sid: str, row: pd.Series, manifest_path: Path) -> list[np.ndarray]:
        """Lesion outlines (level-0 exteriors) of the slide's annotation; [] when none."""
        from wsi_lightning.slides.annotations import lesion_outlines

        return lesion_outlines(row, manifest_path, "attention_logger")

    # ----------------------------------------------------------------- W&B
    def _log_wandb(self, trainer: L.Trainer, images: dict[str, dict[str, list[Path]]]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        ids = sorted(images)[: self.wandb_max_slides]
        if not loggers or not ids:
            return
        for kind in ("heatmap", "topk", "bottomk"):
            files = [(f"{sid}/{p.stem}", str(p)) for sid in ids for p in images[sid][kind]]
            if files:
                for lg in loggers:
                    lg.log_image(key=f"{self.out_dir}/{kind}", images=[f for _, f in files],
                                 step=trainer.global_step, caption=[c for c, _ in files])
