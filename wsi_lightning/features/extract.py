"""Tiling and feature extraction for a manifest, as a Lightning ``predict`` run.

One code path for a laptop CPU, a GPU or several GPUs with DDP: tiles are read by a
``TileDataset`` (slide handles opened lazily in each worker), the backbone runs in
``predict_step``, and a ``StoreWriter`` callback collects each slide's features and writes the
slide to the feature store atomically once its last tile is in. Under DDP whole slides are
assigned to ranks, so every rank writes only complete slides of its own. A rerun skips
complete slides and redoes partial ones. Unreadable slides stop the run, or with
``skip_errors`` are recorded in ``<store>/errors.csv`` while the rest goes on.

A store never mixes settings: before adding slides, extraction checks that the slides already
in the store were made with the same backbone, weights and tiling
(:func:`expected_provenance`, ``FeatureStore.check_provenance``) and refuses otherwise.

A manifest row's region of interest (``roi`` column, :mod:`wsi_lightning.slides.regions`)
restricts its tiles. The ROI file's digest is part of the slide's tile cache key and recorded
in the store (``roi`` attribute: file and digest), so a slide whose ROI changed, appeared or was
removed since it was extracted is tiled and extracted again, never reused.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, Sampler

from wsi_lightning.errors import SlideError, StoreError, WSIError
from wsi_lightning.features.layouts import LAYOUTS, StoreLayout, layout_for
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import Manifest

log = logging.getLogger(__name__)
_PLAIN = StoreLayout({"tile_size": 1, "mpp": 1.0, "min_tissue": 0.0})  # reads a plan without a layout


@dataclass
class TilePlan:
    """The tiles of one slide: level-0 coords plus how they are read."""

    slide_id: str
    path: str
    mpp_override: float | None
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any]
    layout: StoreLayout | None = None  # how rows are read (None: plain tiles)
    grid: Any = None  # the layout's ConcentricGrid / QuadtreeGrid (None for plain tiles)
    extra: dict[str, np.ndarray] | None = None  # per-row arrays for the store (quadtree level, parent)

    def read(self, reader: Any, t: int) -> np.ndarray:
        """Row ``t`` as uint8 pixels (see :meth:`StoreLayout.read`)."""
        return (self.layout or _PLAIN).read(reader, self, t)

    def blank_shape(self) -> tuple[int, ...]:
        return (self.layout or _PLAIN).blank_shape(self)


# ----------------------------------------------------------------------------- provenance
_TILING_KEYS = ("tile_size", "mpp", "min_tissue", "thumb_mpp")


def expected_provenance(tiling: dict, features: dict, backbone: Any = None) -> dict[str, Any]:
    """What extraction with these settings records in the store, as ``check_provenance`` compares it.

    The part of a slide's attributes that decides what its features are: ``backbone`` (the name
    ``build_backbone`` gives it: the preset or timm name itself), ``extraction.weights``,
    ``extraction.pretrained`` (only without a weights file, which overrides it) and
    ``extraction.tiling`` (tile size, mpp, tissue thresholds, and the multiscale keys of the
    chosen mode only). Each key is recorded by :func:`extract_features` with this value, so it
    can be computed from the configuration alone, before any extraction. The stored dtype and
    loader settings (batch size, workers, devices) are not part of it.

    Args:
        tiling: ``tiling:`` config section (plain dict).
        features: ``features:`` config section (plain dict).
        backbone: the built :class:`~wsi_lightning.features.backbones.Backbone`, if there is
            one: adds its ``weights_hash`` (which building it is the only way to know).

    Returns:
        Nested attributes, e.g. ``{"backbone": "demo_cnn", "extraction": {"weights": None,
        "pretrained": False, "tiling": {"tile_size": 64, ...}}}``.
    """
    t: dict[str, Any] = {k: tiling[k] for k in _TILING_KEYS if k in tiling}
    if "multiscale" in tiling:
        ms = tiling.get("multiscale") or {}
        layout = LAYOUTS.get(str(ms.get("mode", "none")))
        t["multiscale"] = ({"mode": ms.get("mode", "none")} if layout is None else
                           {"mode": layout.mode, **{k: ms[k] for k in layout.keys if k in ms}})
    extraction: dict[str, Any] = {"weights": features.get("weights"), "tiling": t,
                                  "backbone_args": dict(features.get("backbone_args") or {})}
    if not features.get("weights"):
        extraction["pretrained"] = features.get("pretrained")
    out: dict[str, Any] = {"backbone": str(features["backbone"]), "extraction": extraction}
    if backbone is not None:
        out.update(backbone=backbone.name, weights_hash=backbone.weights_hash)
    return out


def _recorded_attrs(tiling: dict, features: dict, backbone: Any) -> dict[str, Any]:
    """The store attributes extraction adds to each slide's tiling attributes."""
    return {"backbone": backbone.name, "weights_hash": backbone.weights_hash,
            "extraction": {k: features.get(k) for k in ("backbone", "pretrained", "weights", "dtype", "precision")}
            | {"backbone_args": dict(features.get("backbone_args") or {})}
            | {"tiling": dict(tiling)}}


# ----------------------------------------------------------------------------- tiling
def roi_record(row: pd.Series, where: str) -> dict[str, str] | None:
    """What a slide's store entry records of its manifest ROI (``roi`` column): ``{"file",
    "sha256"}`` (the digest of the file's content), or None when the row has none.

    Raises:
        ManifestError: the ROI file is missing or unreadable (the message names ``where``).
    """
    from wsi_lightning.slides.regions import roi_digest

    roi = row.get("roi")
    if not isinstance(roi, str) or not roi:
        return None
    return {"file": roi, "sha256": roi_digest(roi, where)}


def plan_slide(row: pd.Series, tiling: dict, tiles_dir: Path, where: str | None = None) -> TilePlan:
    """Segment tissue and tile one slide (cached in ``tiles_dir/<slide_id>.npz``).

    The store layout of ``tiling.multiscale.mode`` (:mod:`wsi_lightning.features.layouts`)
    makes the rows: plain tiles, concentric windows (one row per location, S scales) or a
    quadtree (one row per tile of every level, coarsest level first, with per-row ``level`` and
    ``parent`` arrays). A row's ``roi`` restricts the tissue mask to its region
    (:func:`~wsi_lightning.slides.regions.apply_roi`); its digest is part of the cache key.
    Writes ``tiles_dir/qc/<slide_id>.png`` (thumbnail + tissue mask) for a person to check.

    Args:
        where: the manifest row, for errors about its ROI (default: the slide id).
    """
    from wsi_lightning.slides import SlideReader, save_tissue_png, segment_tissue, tile_slide
    from wsi_lightning.slides.regions import apply_roi
    from wsi_lightning.slides.tiling import tile_file, write_tile_file
    from wsi_lightning.slides.tissue import tissue_qc_path

    sid, path = str(row["slide_id"]), str(row["path"])
    where = where or f"slide '{sid}'"
    mpp_override = None if pd.isna(row.get("mpp", np.nan)) else float(row["mpp"])
    layout = layout_for(tiling)
    roi = roi_record(row, where)
    key = layout.cache_key() + ("" if roi is None else f"_roi{roi['sha256']}")  # a new ROI re-tiles
    cache, qc = tile_file(tiles_dir, sid), tissue_qc_path(tiles_dir, sid)  # the id is checked here
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["key"]) == key:
            attrs = {k: z[k].item() for k in ("mpp", "tile_size", "tile_size_um", "level", "extent_level0", "slide_mpp")}
            ms_grid = layout.grid_from_arrays({k[3:]: z[k] for k in z.files if k.startswith("ms_")})
            return _plan(layout, sid, path, mpp_override, z["coords"], attrs, ms_grid, roi)
    if not path:
        raise SlideError(f"slide '{sid}': the manifest gives no path, and tiling reads its pixels; "
                         "fill in the 'path' column")
    with SlideReader(path, mpp=mpp_override) as reader:
        tissue = segment_tissue(reader, thumb_mpp=float(tiling["thumb_mpp"]))
        if roi is not None:
            tissue = apply_roi(tissue, roi["file"], reader.dimensions, reader.mpp, where)
        save_tissue_png(tissue, qc)
        grid = tile_slide(reader, layout.tile_size, layout.mpp, min_tissue=layout.min_tissue, tissue=tissue)
        ms_grid = layout.grid(reader, tissue)
    if len(grid.coords) == 0:
        raise SlideError(
            f"slide {path}: no tile has >= {tiling['min_tissue']:.0%} tissue; check "
            f"{qc} or lower tiling.min_tissue"
        )
    attrs = {"mpp": grid.mpp, "tile_size": grid.tile_size, "tile_size_um": grid.tile_size_um,
             "level": grid.level, "extent_level0": grid.extent_level0, "slide_mpp": grid.slide_mpp}
    extra = {f"ms_{k}": v for k, v in ms_grid.to_arrays().items()} if ms_grid is not None else {}
    write_tile_file(tiles_dir, sid, coords=grid.coords, key=np.array(key), **{k: np.array(v) for k, v in attrs.items()}, **extra)
    return _plan(layout, sid, path, mpp_override, grid.coords, attrs, ms_grid, roi)


def _plan(layout: StoreLayout, sid: str, path: str, mpp_override: float | None, coords: np.ndarray,
          attrs: dict[str, Any], grid: Any, roi: dict[str, str] | None = None) -> TilePlan:
    """The plan of one slide; a multi-scale layout sets the rows and the store attributes (with
    the slide's ROI record, when it has one)."""
    rows, attrs, extra = layout.plan_fields(coords, attrs, grid)
    if roi is not None:
        attrs = {**attrs, "roi": roi}
    return TilePlan(sid, path, mpp_override, rows, attrs, layout, grid, extra)


def _roi_changed(manifest: Manifest, store: FeatureStore) -> list[str]:
    """Complete, extracted slides whose manifest ROI differs from the one their features were
    made with (changed, added or removed): they are tiled and extracted again. Imported slides
    record no tiling, so an ROI cannot be applied to them (warned)."""
    out, imported = [], []
    for i, row in manifest.df.iterrows():
        sid = str(row["slide_id"])
        if not store.is_complete(sid):
            continue
        attrs = store.attrs(sid)
        try:
            now = roi_record(row, f"manifest {manifest.source} row {int(i) + 1}: slide '{sid}'")
        except WSIError:  # a missing or unreadable ROI: tiling reports it (or skips it, skip_errors)
            out.append(sid)
            continue
        if not (isinstance(attrs.get("extraction"), dict) and "tiling" in attrs["extraction"]):
            if now is not None:
                imported.append(sid)
            continue
        was = attrs.get("roi") if isinstance(attrs.get("roi"), dict) else None
        if (was or {}).get("sha256") != (now or {}).get("sha256"):
            log.info("slide %s: its roi changed since extraction (was %s, now %s); tiling and extracting it again",
                     sid, (was or {}).get("file", "none"), (now or {}).get("file", "none"))
            out.append(sid)
    if imported:
        log.warning("%d imported slide(s) have an roi in %s (%s...), but their features were made elsewhere: "
                    "the roi is not applied to them", len(imported), manifest.source, imported[0])
    return out


def _refuse_stale(changed: list[str], plans: list[TilePlan], store: FeatureStore, report: ErrorReport) -> None:
    """Slides whose ROI changed but could not be tiled again (``skip_errors``) keep the features of
    their old ROI in the store, which training would use: refused, naming them."""
    stale = sorted(set(changed) - {p.slide_id for p in plans})
    if stale:
        raise StoreError(
            f"feature store {store.root}: slide(s) {stale} have a new roi that could not be tiled (see "
            f"{report.path}), and the store still holds their features made with the old one, which "
            f"training would use. Fix the roi (or restore the old one), or delete {store.path(stale[0])}"
            f"{' and the others' if len(stale) > 1 else ''} to leave the slide(s) out")


class ErrorReport:
    """Failures of a batch job, appended to a CSV (written atomically) as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []

    def add(self, slide_id: str, path: str, stage: str, err: Exception) -> None:
        log.error("%s failed for slide %s: %s", stage, slide_id, err)
        self.rows.append({"slide_id": slide_id, "path": path, "stage": stage, "error": str(err)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
        pd.DataFrame(self.rows).to_csv(tmp, index=False)
        os.replace(tmp, self.path)


def plan_manifest(manifest: Manifest, tiling: dict, tiles_dir: Path, skip_errors: bool = False,
                  slide_ids: list[str] | None = None,
                  report: ErrorReport | None = None) -> tuple[list[TilePlan], ErrorReport]:
    """Tile every slide of the manifest (or ``slide_ids``); see :func:`plan_slide`.

    Failures go to ``report`` (default ``tiles_dir/errors.csv``) when ``skip_errors``.
    """
    from rich.progress import Progress

    report = report or ErrorReport(tiles_dir / "errors.csv")
    df = manifest.df if slide_ids is None else manifest.df[manifest.df["slide_id"].isin(slide_ids)]
    plans = []
    with Progress(transient=True) as bar:
        task = bar.add_task("tiling slides", total=len(df))
        for i, row in df.iterrows():
            where = f"manifest {manifest.source} row {int(i) + 1}: slide '{row['slide_id']}'"
            try:
                plans.append(plan_slide(row, tiling, tiles_dir, where))
            except WSIError as e:
                if not skip_errors:
                    raise
                report.add(str(row["slide_id"]), str(row["path"]), "tiling", e)
            bar.advance(task)
    return plans, report


# ----------------------------------------------------------------------------- reading
_SLIDES = None  # per-process SlideCache, created lazily in each DataLoader worker


def _slide_cache():
    global _SLIDES
    from wsi_lightning.slides import SlideCache

    if _SLIDES is None:
        _SLIDES = SlideCache(max_open=16)
    return _SLIDES


class TileDataset(Dataset):
    """Tiles of several slides, in slide order.

    Items are dicts: ``image`` (3, T, T) float in [0, 1] (multi-scale: (S, 3, T, T)), ``slide`` (slide index), ``tile``
    (tile index in its slide), ``ok`` (False when the read failed; the image is then zeros).
    """

    def __init__(self, plans: list[TilePlan]) -> None:
        self.plans = plans
        counts = np.array([len(p.coords) for p in plans], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slide_range(self, s: int) -> range:
        return range(int(self.offsets[s]), int(self.offsets[s + 1]))

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        t = i - int(self.offsets[s])
        p = self.plans[s]
        x, y = (int(v) for v in p.coords[t])
        try:
            reader = _slide_cache().get(p.path, mpp=p.mpp_override)
            img = p.read(reader, t)  # (T, T, 3); concentric windows (S, T, T, 3)
            image = torch.from_numpy(np.ascontiguousarray(img)).movedim(-1, -3).float().div_(255)
            ok = True
        except Exception as e:  # noqa: BLE001 - recorded by the writer, named by slide
            log.error("slide %s: reading tile at (%d, %d) failed: %s", p.path, x, y, e)
            image, ok = torch.zeros(p.blank_shape()), False
        return {"image": image, "slide": s, "tile": t, "ok": ok}


class SlideShardSampler(Sampler[int]):
    """Whole slides per rank (slide s goes to rank s % world), in order, no padding."""

    def __init__(self, ds: TileDataset, rank: int = 0, world: int = 1) -> None:
        self.idx = [i for s in range(rank, len(ds.plans), world) for i in ds.slide_range(s)]

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


# ----------------------------------------------------------------------------- Lightning
class TileDataModule(L.LightningDataModule):
    """Predict-only DataModule; the slide shard of each rank is chosen once ranks are known."""

    def __init__(self, ds: TileDataset, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.ds, self.batch_size, self.num_workers = ds, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.ds, batch_size=self.batch_size,
                          sampler=SlideShardSampler(self.ds, rank, world),
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``features.precision`` on this device (None: full fp32).

    bf16 runs under autocast on GPUs and CPUs; fp16 on GPUs only (CPUs fall back to fp32, warned).
    """
    if precision not in PRECISIONS:
        raise WSIError(f"features.precision={precision!r}; expected one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device_type == "cpu":
        log.warning("features.precision=fp16 has no CPU autocast; extracting in fp32 (bf16 does run on CPU)")
        return None
    return dtype


class ExtractionModule(L.LightningModule):
    """Wraps a backbone for ``Trainer.predict``: (B, 3, T, T) -> (B, D), under autocast when
    ``precision`` is bf16 / fp16 (features are returned as fp32)."""

    def __init__(self, backbone: torch.nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.precision_name = precision
        autocast_dtype(precision, "cuda")  # a bad value fails before any tile is read

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]  # (B, 3, T, T) or multi-scale (B, S, 3, T, T)
        dtype = autocast_dtype(self.precision_name, x.device.type)
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            if x.dim() == 5:
                b, s = x.shape[:2]
                return self.backbone(x.flatten(0, 1)).float().view(b, -1)  # (B, S * D), scales in order
            return self.backbone(x).float()


class StoreWriter(BasePredictionWriter):
    """Collects features per slide and writes each slide once its last tile arrives."""

    def __init__(self, ds: TileDataset, store: FeatureStore, extra_attrs: dict, dtype: str,
                 report: ErrorReport) -> None:
        super().__init__(write_interval="batch")
        self.ds, self.store, self.extra, self.report = ds, store, extra_attrs, report
        self.dtype = np.dtype(dtype)
        self.buf: dict[int, np.ndarray] = {}
        self.filled: dict[int, int] = {}
        self.failed: set[int] = set()
        self.written: list[str] = []
        self._bar = None
        try:  # the store's feature dim: every slide written must have it
            self.dim: int | None = store.feature_dim()
        except StoreError:
            self.dim = None  # empty store: the first slide written sets it

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from rich.progress import Progress

            self._bar = Progress()
            self._bar.start()
            what = "tiles (all slides)" if trainer.world_size == 1 else "tiles (rank 0's slides)"
            self._all = self._bar.add_task(what, total=len(trainer.predict_dataloaders.sampler))
            self._cur = self._bar.add_task("slide", total=1)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        feats = prediction.detach().cpu().numpy()  # (B, D)
        for j, (s, t, ok) in enumerate(zip(batch["slide"].tolist(), batch["tile"].tolist(), batch["ok"].tolist(), strict=True)):
            n = len(self.ds.plans[s].coords)
            if s not in self.buf:
                self.buf[s] = np.zeros((n, feats.shape[1]), dtype=self.dtype)
                self.filled[s] = 0
                if self._bar is not None:
                    self._bar.reset(self._cur, total=n, description=f"slide {self.ds.plans[s].slide_id}")
            self.buf[s][t] = feats[j]
            self.filled[s] += 1
            if not ok:
                self.failed.add(s)
            if self.filled[s] == n:
                self._finish(s)
        if self._bar is not None:
            self._bar.advance(self._all, len(feats))
            self._bar.advance(self._cur, len(feats))

    def _finish(self, s: int) -> None:
        p = self.ds.plans[s]
        feats = self.buf.pop(s)
        if s in self.failed:
            err = SlideError(f"slide {p.path}: some tiles could not be read (see the log); not written")
            self.report.add(p.slide_id, p.path, "extraction", err)
            return
        if self.dim is not None and feats.shape[1] != self.dim:
            raise StoreError(
                f"feature store {self.store.root}: slide '{p.slide_id}' has {feats.shape[1]}-d "
                f"features but the store's slides are {self.dim}-d (made with other settings); "
                "extract into another store (data.store=<folder>) or delete this one"
            )
        self.dim = feats.shape[1]
        attrs = {**p.attrs, **self.extra}
        self.store.write_slide(p.slide_id, feats, p.coords.astype(np.int64), attrs, extra=p.extra)
        self.written.append(p.slide_id)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.stop()


def extract_features(
    manifest: Manifest,
    store: FeatureStore,
    tiling: dict,
    features: dict,
    skip_errors: bool = False,
    tiles_dir: Path | None = None,
    report: ErrorReport | None = None,
) -> list[str]:
    """Tile and extract every slide of ``manifest`` that the store lacks.

    Args:
        manifest: slides to process.
        store: destination; complete slides are skipped, partial ones redone.
        tiling: ``tiling:`` config section (tile_size, mpp, min_tissue, thumb_mpp).
        features: ``features:`` config section (backbone, pretrained, weights, batch_size,
            num_workers, dtype, accelerator, devices).
        skip_errors: record failing slides in ``errors.csv`` and go on.
        tiles_dir: tile cache (default ``<store>/tiles``).
        report: where failures are recorded (default ``<store>/errors.csv``); its ``rows`` say
            how many slides failed in this call.

    Returns:
        The slide ids written by this process.

    Raises:
        StoreError: the store's slides were made with other settings (backbone, weights,
            tiling) or imported: slides made now would mix with them.
    """
    from wsi_lightning.features.backbones import build_backbone

    store.clean_partial()
    changed = _roi_changed(manifest, store)
    todo = [s for s in manifest.df["slide_id"] if not store.is_complete(s)] + changed
    if not todo:
        return []
    store.check_provenance(expected_provenance(tiling, features), adding=True)  # before any tiling
    tiles_dir = tiles_dir or store.root / "tiles"
    log.info("feature store %s: %d of %d slides to extract", store.root, len(todo), len(manifest.df))
    report = report if report is not None else ErrorReport(store.root / "errors.csv")
    plans, _ = plan_manifest(manifest, tiling, tiles_dir, skip_errors, slide_ids=todo, report=report)
    _refuse_stale(changed, plans, store, report)
    if not plans:
        return []
    backbone = build_backbone(str(features["backbone"]), pretrained=bool(features.get("pretrained", False)),
                              weights=features.get("weights"), **dict(features.get("backbone_args") or {}))
    store.check_provenance(expected_provenance(tiling, features, backbone), adding=True)  # + weights hash
    if backbone.input_px and (int(tiling["tile_size"]), float(tiling["mpp"])) != (backbone.input_px, backbone.mpp):
        log.warning("backbone %s was trained on %d px tiles at %g µm/px; these are %d px at %g µm/px "
                    "(set tiling.tile_size=%d tiling.mpp=%g to match its model card)", backbone.name,
                    backbone.input_px, backbone.mpp, int(tiling["tile_size"]), float(tiling["mpp"]),
                    backbone.input_px, backbone.mpp)
    extra = _recorded_attrs(tiling, features, backbone)
    ds = TileDataset(plans)
    writer = StoreWriter(ds, store, extra, str(features.get("dtype", "float16")), report)
    trainer = L.Trainer(
        accelerator=str(features.get("accelerator", "auto")), devices=features.get("devices", 1),
        callbacks=[writer], logger=False, enable_progress_bar=False, use_distributed_sampler=False,
        enable_model_summary=False,
    )
    data = TileDataModule(ds, int(features.get("batch_size", 64)), int(features.get("num_workers", 0)))
    module = ExtractionModule(backbone, str(features.get("precision", "fp32")))
    trainer.predict(module, datamodule=data, return_predictions=False)
    if report.rows and not skip_errors:
        raise WSIError(f"extraction failed for {len(report.rows)} slide(s); see {report.path} "
                       "(rerun to retry; --skip-errors to go on without them)")
    return writer.written
