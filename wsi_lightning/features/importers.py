"""Import features extracted by other tools (CLAM, TRIDENT) into a ``FeatureStore``.

Supported inputs (``fmt``; ``"auto"`` picks from the suffix and the file's contents):

    clam_h5     CLAM ``h5_files/<slide>.h5``: datasets ``features`` (N, D) and ``coords``
                (N, 2); ``coords`` attributes ``patch_level``, ``patch_size``, ``downsample``
                are used when present.
    trident_h5  TRIDENT ``features_<encoder>/<slide>.h5``: the same datasets, with
                ``coords`` attributes ``patch_size``, ``patch_size_level0``,
                ``target_magnification``, ``level0_magnification``.
    clam_pt     CLAM ``pt_files/<slide>.pt``: a (N, D) tensor (or a dict with ``features`` and
                optionally ``coords``); coordinates come from ``<coords_dir>/<slide>.h5`` (CLAM's
                ``patches/`` folder).

The slide id is the file stem. Attributes derived from the file are overridden by the
``attrs`` argument (e.g. ``{"mpp": 0.5, "backbone": "uni_v1"}``); every attribute the file had is
kept under ``attrs["source_attrs"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_lightning.errors import StoreError
from wsi_lightning.features.store import FeatureStore

logger = logging.getLogger(__name__)

FORMATS = ("auto", "clam_h5", "trident_h5", "clam_pt")
_H5_SUFFIXES = (".h5", ".hdf5")
_PT_SUFFIXES = (".pt", ".pth")
_TRIDENT_KEYS = ("patch_size_level0", "target_magnification", "level0_magnification")


def import_features(
    paths: list[Path] | Path,
    store: FeatureStore,
    fmt: str = "auto",
    coords_dir: Path | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Copy per-slide feature files into ``store``.

    Args:
        paths: Feature files, or directories (all ``.h5/.hdf5/.pt/.pth`` files inside).
        store: Destination store.
        fmt: One of ``FORMATS``.
        coords_dir: Folder of ``<slide>.h5`` files with a ``coords`` dataset, needed for
            ``.pt`` bags that carry no coordinates.
        attrs: Attributes that override what is derived from the files.
        overwrite: Re-import slides that are already complete in the store.

    Returns:
        Ids of the slides imported (skipped ones excluded), in input order.

    Raises:
        StoreError: Unknown format, unreadable file, missing dataset or inconsistent shapes.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown feature format '{fmt}'; expected one of {list(FORMATS)}")
    files = _expand(paths)
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise StoreError(
                f"two files give slide id '{file.stem}': {stems[file.stem]} and {file}; "
                "import them into different stores"
            )
        stems[file.stem] = file
    imported: list[str] = []
    for file in files:
        slide_id = file.stem
        if not overwrite and store.is_complete(slide_id):
            logger.info(
                "slide '%s' already in %s; skipped (overwrite=True redoes it)", slide_id, store.root
            )
            continue
        features, coords, derived = read_feature_file(file, fmt, coords_dir)
        store.write_slide(slide_id, features, coords, {**derived, **(attrs or {})})
        imported.append(slide_id)
    logger.info("imported %d of %d slides into %s", len(imported), len(files), store.root)
    return imported


def read_feature_file(
    path: Path, fmt: str = "auto", coords_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one CLAM/TRIDENT feature file.

    Returns:
        features: (N, D) float16/float32.
        coords: (N, 2) int64 level-0 (x, y).
        attrs: Store attributes derived from the file (``source_attrs`` holds the raw ones).
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"feature file {path} does not exist")
    if fmt == "auto":
        fmt = _detect(path)
    if fmt == "clam_pt":
        return _read_pt(path, coords_dir)
    if fmt in ("clam_h5", "trident_h5"):
        features, coords, source = _read_h5(path, need_features=True)
        derived = _trident_attrs(source) if fmt == "trident_h5" else _clam_attrs(source)
        return features, coords, {**derived, "extraction": {"source": fmt, "file": str(path)}}
    raise StoreError(f"{path}: unknown feature format '{fmt}'; expected one of {list(FORMATS)}")


# ---------------------------------------------------------------------- reading
def _expand(paths: list[Path] | Path) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir() if p.suffix.lower() in _H5_SUFFIXES + _PT_SUFFIXES
            )
            if not found:
                raise StoreError(f"{item}: no .h5/.hdf5/.pt/.pth feature files in this folder")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise StoreError(f"feature file {item} does not exist")
    return files


def _detect(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _PT_SUFFIXES:
        return "clam_pt"
    if suffix in _H5_SUFFIXES:
        try:
            with h5py.File(path, "r") as f:
                keys = set(f["coords"].attrs) if "coords" in f else set()
        except OSError as e:
            raise StoreError(f"{path}: not a readable HDF5 file ({e})") from e
        return "trident_h5" if keys & set(_TRIDENT_KEYS) else "clam_h5"
    raise StoreError(
        f"{path}: cannot tell the feature format from suffix '{path.suffix}'; pass fmt= one of "
        f"{list(FORMATS[1:])}"
    )


def _read_h5(
    path: Path, need_features: bool
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Datasets ``features`` (optional) and ``coords`` plus all attributes of the file."""
    try:
        with h5py.File(path, "r") as f:
            wanted = ("features", "coords") if need_features else ("coords",)
            missing = [k for k in wanted if k not in f]
            if missing:
                raise StoreError(
                    f"{path}: missing dataset(s) {missing}; expected {list(wanted)} (found "
                    f"{sorted(f.keys())}); is this a CLAM/TRIDENT feature file?"
                )
            source = {f"file.{k}": v for k, v in f.attrs.items()}
            for name in wanted:
                source.update({k: v for k, v in f[name].attrs.items()})
            features = _squeeze(f["features"][()], path, 2) if need_features else None
            coords = _squeeze(f["coords"][()], path, 2)
    except OSError as e:
        raise StoreError(f"{path}: not a readable HDF5 file ({e})") from e
    _check_coords(path, coords, None if features is None else features.shape[0])
    return features, coords, _plain(source)


def _read_pt(path: Path, coords_dir: Path | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(
            f"{path}: cannot load as a tensor file with weights_only=True ({e}); expected a "
            "(N, D) tensor or a dict with 'features' (and 'coords')"
        ) from e
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise StoreError(
                f"{path}: dict without a 'features' key (keys: {sorted(map(str, obj))}); expected "
                "a (N, D) tensor or a dict with 'features' and optionally 'coords'"
            )
        coords, obj = obj.get("coords"), obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise StoreError(f"{path}: expected a (N, D) tensor, got {type(obj).__name__}")
    if obj.dtype not in (torch.float16, torch.float32):
        obj = obj.float()
    features = _squeeze(obj.numpy(), path, 2)
    source: dict[str, Any] = {}
    if coords is not None:
        coords = _squeeze(np.asarray(coords), path, 2)
        _check_coords(path, coords, features.shape[0])
    else:
        coords, source = _coords_from_dir(path, coords_dir, features.shape[0])
    attrs = _clam_attrs(source)
    attrs["extraction"] = {"source": "clam_pt", "file": str(path)}
    return features, coords, attrs


def _coords_from_dir(
    path: Path, coords_dir: Path | None, n: int
) -> tuple[np.ndarray, dict[str, Any]]:
    if coords_dir is None:
        raise StoreError(
            f"{path}: a .pt bag holds features only, and tile coordinates are needed; pass "
            "--coords-dir (coords_dir=) pointing at the folder of CLAM patch files "
            f"(<coords_dir>/{path.stem}.h5 with a 'coords' dataset)"
        )
    coords_file = Path(coords_dir) / f"{path.stem}.h5"
    if not coords_file.is_file():
        raise StoreError(
            f"{path}: coordinates file {coords_file} not found; --coords-dir must hold "
            f"'{path.stem}.h5' with a 'coords' dataset (CLAM's patches/ folder)"
        )
    _, coords, source = _read_h5(coords_file, need_features=False)
    if coords.shape[0] != n:
        raise StoreError(
            f"{path}: {n} feature rows but {coords.shape[0]} coordinates in {coords_file}; "
            "the two files must come from the same patching run"
        )
    return coords, source


def _squeeze(array: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    """Drop leading size-1 axes (some tools save (1, N, D)); require ``ndim`` dims."""
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    if array.ndim != ndim:
        raise StoreError(
            f"{path}: expected a {ndim}-D array (features (N, D), coords (N, 2)), got shape "
            f"{array.shape}; slide-level embeddings cannot be used as MIL bags"
        )
    return array


def _check_coords(path: Path, coords: np.ndarray, n: int | None) -> None:
    if coords.shape[1] != 2:
        raise StoreError(f"{path}: coords must have shape (N, 2), got {coords.shape}")
    if n is not None and coords.shape[0] != n:
        raise StoreError(
            f"{path}: features have {n} rows but coords have {coords.shape[0]}; expected one "
            "(x, y) per feature row"
        )


# ---------------------------------------------------------------------- attributes
def _clam_attrs(source: dict[str, Any]) -> dict[str, Any]:
    """CLAM patch attrs: ``patch_level``, ``patch_size`` (at that level), ``downsample``."""
    out: dict[str, Any] = {"source_attrs": source}
    level, size = _num(source.get("patch_level")), _num(source.get("patch_size"))
    if level is not None:
        out["level"] = int(level)
    if size is not None:
        out["tile_size"] = int(size)
        down = source.get("downsample")
        down = _num(down[0] if isinstance(down, list) and down else down)
        if down is not None:
            out["extent_level0"] = int(round(size * down))
        elif level == 0:
            out["extent_level0"] = int(size)
    return out


def _trident_attrs(source: dict[str, Any]) -> dict[str, Any]:
    """TRIDENT coords attrs; mpp is the nominal 10 / magnification (20x -> 0.5 um/px)."""
    out: dict[str, Any] = {"source_attrs": source}
    size, size0 = _num(source.get("patch_size")), _num(source.get("patch_size_level0"))
    mag = _num(source.get("target_magnification"))
    if size is not None:
        out["tile_size"] = int(size)
    if size0 is not None:
        out["extent_level0"] = int(size0)
    if mag:
        out["mpp"] = 10.0 / mag
        if size is not None:
            out["tile_size_um"] = size * out["mpp"]
    return out


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    """HDF5 attribute values (numpy scalars/arrays, bytes) as JSON-able python values."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.ndarray):
            value = value.item() if value.ndim == 0 else value.tolist()
            if isinstance(value, list):
                value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, int, float, bool, list)) or value is None:
            out[str(key)] = value
    return out
