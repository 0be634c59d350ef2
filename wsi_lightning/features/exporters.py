"""Export a ``FeatureStore`` as CLAM or TRIDENT feature files, so our extraction feeds their tools.

    clam        ``<out>/h5_files/<slide>.h5`` (datasets ``features`` (N, D) float32 and
                ``coords`` (N, 2) int64, what CLAM's ``extract_features_fp.py`` writes) and
                ``<out>/pt_files/<slide>.pt`` (the (N, D) float32 tensor CLAM's training reads).
                ``coords`` carries CLAM's patch attributes ``patch_level``, ``patch_size``,
                ``downsample``.
    trident     ``<out>/features_<encoder>/<slide>.h5`` with the same datasets; ``coords``
                carries TRIDENT's ``patch_size``, ``patch_size_level0``,
                ``target_magnification``, ``level0_magnification``, ``overlap``.

A slide imported from CLAM/TRIDENT (:mod:`wsi_lightning.features.importers`) is written back
with the attributes it came with, so import then export gives the source files' datasets and
attributes. A slide we extracted gets attributes derived from its tiling: we read tiles at a
target µm/px (resampling when no pyramid level matches), so for CLAM the patch is stated at
level 0 (``patch_level`` 0, ``patch_size`` = the tile's side in level-0 px, ``downsample``
1), which reads the same tissue back; TRIDENT's ``target_magnification`` is the nominal
10 / mpp (0.5 µm/px -> 20x). Every file is written atomically; existing files are kept unless
``overwrite``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_lightning.errors import StoreError
from wsi_lightning.features.store import FeatureStore

logger = logging.getLogger(__name__)

FORMATS = ("clam", "trident")


def export_features(store: FeatureStore, out: Path, fmt: str = "clam", slides: list[str] | None = None,
                    encoder: str | None = None, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Write the store's slides as CLAM / TRIDENT feature files under ``out``.

    Args:
        store: the feature store.
        out: the output folder (CLAM's ``FEATURES_DIRECTORY`` / TRIDENT's patch-settings folder).
        fmt: ``clam`` or ``trident``.
        slides: slide ids to export (None: every complete slide).
        encoder: TRIDENT's folder name ``features_<encoder>`` (default: the store's backbone).
        overwrite: replace existing files (otherwise they are kept and skipped).
        progress: show a progress bar.

    Returns:
        The ``.h5`` files written.

    Raises:
        StoreError: unknown format, an empty store, or a slide the store does not hold.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format '{fmt}'; expected one of {list(FORMATS)}")
    complete = store.complete_slides()
    if not complete:
        raise StoreError(f"feature store {store.root}: no complete slides to export; run `wsi extract` "
                         "or `wsi import-features` first")
    ids = sorted(complete) if slides is None else list(slides)
    lacking = sorted(set(ids) - set(complete))
    if lacking:
        raise StoreError(f"feature store {store.root} lacks slide(s) {lacking[:10]}; export only what "
                         f"it holds ({len(complete)} slides, e.g. {sorted(complete)[:3]})")
    if fmt == "trident":
        name = encoder or str(store.attrs(ids[0]).get("backbone") or "unknown")
        h5_dir = Path(out) / f"features_{Path(name).name}"
    else:
        h5_dir = Path(out) / "h5_files"
    written: list[Path] = []
    from rich.progress import track

    for sid in track(ids, description=f"export {fmt}", transient=True, disable=not progress or len(ids) < 4):
        target = h5_dir / f"{sid}.h5"
        if target.exists() and not overwrite:
            logger.info("%s exists; kept (overwrite=True replaces it)", target)
            continue
        feats, coords = store.read(sid)
        feats = np.asarray(feats, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.int64)
        attrs = store.attrs(sid)
        file_attrs, coord_attrs = _attributes(attrs, fmt)
        _write_h5(target, feats, coords, file_attrs, coord_attrs)
        if fmt == "clam":
            _write_pt(Path(out) / "pt_files" / f"{sid}.pt", feats)
        written.append(target)
    logger.info("exported %d of %d slide(s) from %s to %s", len(written), len(ids), store.root, h5_dir)
    return written


def _attributes(attrs: dict[str, Any], fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(file attributes, ``coords`` attributes) of one slide's export."""
    source = attrs.get("source_attrs")
    extraction = attrs.get("extraction")
    came_from = extraction.get("source") if isinstance(extraction, dict) else None
    if isinstance(source, dict) and came_from in ("clam_h5", "trident_h5", "clam_pt") \
            and (came_from == "trident_h5") == (fmt == "trident"):
        file_attrs = {k[len("file."):]: v for k, v in source.items() if k.startswith("file.")}
        return file_attrs, {k: v for k, v in source.items() if not k.startswith("file.")}
    extent = attrs.get("extent_level0")
    if extent is None:
        return {}, {}
    if fmt == "clam":
        return {}, {"patch_level": 0, "patch_size": int(extent), "downsample": np.array([1.0, 1.0])}
    out: dict[str, Any] = {"patch_size_level0": int(extent), "overlap": 0}
    if attrs.get("tile_size") is not None:
        out["patch_size"] = int(attrs["tile_size"])
    if attrs.get("mpp"):
        out["target_magnification"] = 10.0 / float(attrs["mpp"])
    if attrs.get("slide_mpp"):
        out["level0_magnification"] = 10.0 / float(attrs["slide_mpp"])
    return {}, out


def _h5_value(value: Any) -> Any:
    """A JSON-like attribute value as HDF5 can store it (lists as arrays)."""
    if isinstance(value, list):
        return np.asarray(value)
    return value


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; moved onto ``path`` only if the block
    finishes, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_h5(path: Path, feats: np.ndarray, coords: np.ndarray, file_attrs: dict[str, Any],
              coord_attrs: dict[str, Any]) -> None:
    with _atomic(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=coords)
        for target, attrs in ((f, file_attrs), (ds, coord_attrs)):
            for k, v in attrs.items():
                if v is not None:
                    target.attrs[k] = _h5_value(v)


def _write_pt(path: Path, feats: np.ndarray) -> None:
    import torch

    with _atomic(path) as tmp:
        torch.save(torch.from_numpy(feats), tmp)
