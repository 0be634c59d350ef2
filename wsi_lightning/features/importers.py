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

``paths`` may also be a tool's results folder as it is laid out:

    CLAM        ``FEATURES_DIRECTORY`` holding ``h5_files/`` (used: features + coords) and
                ``pt_files/``; with ``pt_files/`` alone the coordinates come from ``coords_dir``
                or a ``patches/`` folder beside it.
    TRIDENT     the job folder (``<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/``)
                or any folder on the way down; with several encoders or patch settings the
                error lists them (pass the one meant). ``slide_features_*`` (slide embeddings)
                are never bags and are skipped.

CLAM's ``h5_files`` carry no attributes; when ``coords_dir`` (CLAM's ``patches/``) is given, or
found beside the folder, its ``coords`` attributes (patch level, size, downsample) are used.

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
        coords_dir: Folder of ``<slide>.h5`` files with a ``coords`` dataset (CLAM's
            ``patches/``), needed for ``.pt`` bags that carry no coordinates and read for the
            patch attributes CLAM's ``h5_files`` lack; found beside a results folder if None.
        attrs: Attributes that override what is derived from the files.
        overwrite: Re-import slides that are already complete in the store.

    Returns:
        Ids of the slides imported (skipped ones excluded), in input order.

    Raises:
        StoreError: Unknown format, unreadable file, missing dataset or inconsistent shapes.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown feature format '{fmt}'; expected one of {list(FORMATS)}")
    pairs = _expand(paths, coords_dir)
    files = [f for f, _ in pairs]
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise StoreError(
                f"two files give slide id '{file.stem}': {stems[file.stem]} and {file}; "
                "import them into different stores"
            )
        stems[file.stem] = file
    imported: list[str] = []
    for file, file_coords_dir in pairs:
        slide_id = file.stem
        if not overwrite and store.is_complete(slide_id):
            logger.info(
                "slide '%s' already in %s; skipped (overwrite=True redoes it)", slide_id, store.root
            )
            continue
        features, coords, derived = read_feature_file(file, fmt, file_coords_dir)
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
        if fmt == "clam_h5" and coords_dir is not None and "patch_size" not in source:
            source = {**_patch_attrs(path, coords_dir, coords), **source}
        derived = _trident_attrs(source) if fmt == "trident_h5" else _clam_attrs(source)
        return features, coords, {**derived, "extraction": {"source": fmt, "file": str(path)}}
    raise StoreError(f"{path}: unknown feature format '{fmt}'; expected one of {list(FORMATS)}")


# ---------------------------------------------------------------------- reading
def _feature_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _H5_SUFFIXES + _PT_SUFFIXES)


def feature_folder(folder: Path) -> Path:
    """The folder of per-slide feature files inside ``folder``: itself when it holds them, a
    CLAM features folder's ``h5_files/`` (else ``pt_files/``), or the one TRIDENT
    ``features_<encoder>/`` folder below it (at most two levels down)."""
    if _feature_files(folder):
        return folder
    for name in ("h5_files", "pt_files"):
        if (folder / name).is_dir() and _feature_files(folder / name):
            return folder / name
    found = sorted(p for pattern in ("features_*", "*/features_*") for p in folder.glob(pattern)
                   if p.is_dir() and _feature_files(p))
    if len(found) == 1:
        return found[0]
    if found:
        listed = "\n  ".join(str(p) for p in found)
        raise StoreError(f"{folder}: several feature folders (encoders or patch settings):\n  {listed}\n"
                         "import one of them (each into its own store)")
    raise StoreError(f"{folder}: no .h5/.hdf5/.pt/.pth feature files in this folder, nor a CLAM "
                     "h5_files/ / pt_files/ folder, nor a TRIDENT features_<encoder>/ folder below it")


def patches_folder(features_dir: Path) -> Path | None:
    """CLAM's or TRIDENT's ``patches/`` (per-slide coords with attributes) near a feature
    folder: inside it, beside it, beside its parent, or the one ``*/patches`` beside its parent
    (CLAM's RESULTS_DIRECTORY and FEATURES_DIRECTORY are often siblings); None when there is
    none (or several)."""
    for cand in (features_dir / "patches", features_dir.parent / "patches",
                 features_dir.parent.parent / "patches"):
        if cand.is_dir():
            return cand
    siblings = [p for p in features_dir.parent.parent.glob("*/patches") if p.is_dir()]
    return siblings[0] if len(siblings) == 1 else None  # RESULTS_DIRECTORY/patches beside FEATURES_DIRECTORY


def _expand(paths: list[Path] | Path, coords_dir: Path | None) -> list[tuple[Path, Path | None]]:
    """(feature file, its coords folder) for every file given or found in a folder given."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[tuple[Path, Path | None]] = []
    for item in map(Path, items):
        if item.is_dir():
            folder = feature_folder(item)
            near = coords_dir if coords_dir is not None else patches_folder(folder)
            if folder != item or near is not None:
                logger.info("%s: importing the feature files in %s%s", item, folder,
                            f" (coordinates' attributes from {near})" if near else "")
            files.extend((f, near) for f in _feature_files(folder))
        elif item.is_file():
            files.append((item, coords_dir))
        else:
            raise StoreError(f"feature file {item} does not exist")
    return files


def _patch_attrs(path: Path, coords_dir: Path, coords: np.ndarray) -> dict[str, Any]:
    """The ``coords`` attributes of ``<coords_dir>/<slide>.h5`` (CLAM's patch file) when it
    holds the same coordinates as ``path``; {} when there is no such file."""
    patch_file = Path(coords_dir) / f"{path.stem}.h5"
    if not patch_file.is_file():
        return {}
    _, patch_coords, attrs = _read_h5(patch_file, need_features=False)
    def rows(c: np.ndarray) -> np.ndarray:  # the set of (x, y) rows, in one order
        return c[np.lexsort((c[:, 1], c[:, 0]))]

    if patch_coords.shape != coords.shape or not np.array_equal(rows(patch_coords), rows(coords)):
        raise StoreError(f"{path}: its coords differ from those in {patch_file} ({coords.shape[0]} vs "
                         f"{patch_coords.shape[0]} tiles); pass the patches/ folder of the same run as "
                         "--coords-dir")
    return attrs


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
