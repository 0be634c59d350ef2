"""Per-slide feature store: one zarr v3 group per slide, written atomically, read fast.

Layout::

    <root>/
      <slide_id>.zarr/
        zarr.json            group metadata; attributes (see below), ``complete`` written last
        features/            (N, D) float16/float32, uncompressed, one chunk
        coords/              (N, 2) int64 level-0 (x, y) of each tile's top-left corner
        <extra>/             optional per-row arrays (N, ...), e.g. ``level`` and ``parent`` of a
                             quadtree (``write_slide(..., extra=...)``, ``read_extra``)
      .tmp-<slide_id>-@<host>-<pid>-<hex>.zarr/    a write in progress (or an interrupted one)
      .trash-<slide_id>-@<host>-<pid>-<hex>.zarr/  an entry being replaced (for a moment)

Group attributes. Callers (extraction, importers) provide:

    mpp (float | None)           microns per pixel of the tiles fed to the backbone
    tile_size (int | None)       tile side in pixels at that resolution
    tile_size_um (float | None)  tile side in microns (``tile_size * mpp``)
    level (int | None)           pyramid level the tiles were read from
    extent_level0 (int | None)   tile side in level-0 pixels (coords step on a dense grid)
    backbone (str | None)        backbone name (registry or timm name)
    weights_hash (str | None)    ``Backbone.weights_hash`` of the weights used
    extraction (dict)            anything else about how the features were made

Missing caller keys are stored as ``None`` so readers can rely on the keys existing. The store
itself sets ``complete``, ``num_instances``, ``feature_dim`` and ``format_version`` (values a
caller passes for these keys are replaced).

Reading: ``read`` does not go through zarr's per-call machinery. When an array is a single
uncompressed little-endian chunk (what ``write_slide`` produces) its chunk file (``c/0/0``) is
raw C-order bytes, so it is read straight into a new numpy array with one ``preadv`` after
checking the array's ``zarr.json`` once (parsed metadata is cached per slide; a rewritten slide
is noticed by its directory's inode and the chunk file's size). Any other layout (a store
written by another tool) falls back to the zarr API. Every read of ``features`` (and of float
``extra`` arrays) checks the values are finite: a chunk file overwritten with NaN, or with
garbage bytes of the right size, raises ``StoreError`` naming the slide instead of training on NaN.

Several machines may write into one store on a shared file system. Temp and trash names carry
the writer's host (``-`` replaced by ``_``) and PID; ``clean_partial`` removes those of dead
processes of *this* host at once, and those of other hosts only once they are older than
``stale_age_s`` (default ``STALE_AGE_S``, 6 hours; a slide's write takes seconds, so an older
one was abandoned). Names without a host (``.tmp-<slide_id>-<pid>-<hex>.zarr``, written by
versions that assumed one machine per store) are judged as those versions did: by PID here.

Provenance: ``check_provenance`` compares what every complete slide records (backbone, weights
hash, tiling...) with what the current configuration would write (``features.extract.
expected_provenance``), so a store made with other settings is not reused, or mixed, silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from wsi_lightning.errors import StoreError
from wsi_lightning.ids import safe_slide_id

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CALLER_ATTRS = (
    "mpp",
    "tile_size",
    "tile_size_um",
    "level",
    "extent_level0",
    "backbone",
    "weights_hash",
    "extraction",
)
STORE_ATTRS = ("complete", "num_instances", "feature_dim", "format_version", "extra_arrays")
_ARRAYS = ("features", "coords")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_SUFFIX = ".zarr"
STALE_AGE_S = 6 * 3600.0  # other hosts' temp folders older than this are abandoned writes
_HOST_MARK = "@"  # marks the host field of temp/trash names (old names have none)
_FAST_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}  # fmt: skip


class _ChunkMeta(NamedTuple):
    """What the fast path needs to read one single-chunk array: file, shape, dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


class _SlideMeta(NamedTuple):
    inode: int  # inode of <slide>.zarr: changes when the slide is rewritten (rename)
    features: _ChunkMeta | None  # None: layout not fast-readable, use the zarr API
    coords: _ChunkMeta | None


class FeatureStore:
    """A directory of per-slide zarr groups holding tile features and coordinates.

    Args:
        root: Store directory; created on the first write.
        cache_size: Number of slides whose parsed array metadata is kept in memory.
        stale_age_s: Age (seconds, by mtime) after which ``clean_partial`` removes temp/trash
            folders of *other* hosts (whose processes it cannot see).

    Example:
        >>> store = FeatureStore("data/features/resnet50_trunc")
        >>> store.write_slide("s1", feats, coords, {"mpp": 0.5, "tile_size": 256, ...})
        >>> features, coords = store.read("s1")   # (N, D), (N, 2)
    """

    def __init__(
        self, root: str | Path, cache_size: int = 65536, stale_age_s: float = STALE_AGE_S
    ) -> None:
        self.root = Path(root)
        self._cache_size = cache_size
        self.stale_age_s = float(stale_age_s)
        self._meta: OrderedDict[str, _SlideMeta] = OrderedDict()
        self._finite: set[tuple] = set()  # versions of feature files checked finite (_read_array)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # ------------------------------------------------------------------ paths / status
    def path(self, slide_id: str) -> Path:
        """Directory of a slide's zarr group: ``root / f"{slide_id}.zarr"``."""
        return self.root / f"{slide_id}{_SUFFIX}"

    def is_complete(self, slide_id: str) -> bool:
        """Whether the slide's group exists and its write finished (``complete`` attribute)."""
        attrs = _read_group_attrs(self.path(slide_id))
        return bool(attrs is not None and attrs.get("complete") is True)

    def complete_slides(self) -> list[str]:
        """Sorted ids of all complete slides in the store."""
        return sorted(sid for sid in self._slide_dirs() if self.is_complete(sid))

    def clean_partial(self, stale_age_s: float | None = None) -> list[str]:
        """Remove interrupted writes: temp/trash dirs of dead processes and incomplete groups.

        Temp dirs of a process of this host that is still running (another extraction job
        writing into the same store) are left alone. Those of another host (a second node on
        a shared file system) are removed only when older than ``stale_age_s`` (default: the
        store's ``stale_age_s``), since that host's processes cannot be seen from here.

        Returns:
            Names of the removed directories (relative to ``root``).
        """
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        max_age = self.stale_age_s if stale_age_s is None else float(stale_age_s)
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if not (entry.is_dir() and name.endswith(_SUFFIX)):
                continue
            if name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                if _in_use(entry, max_age):
                    continue
            elif name.startswith(".") or self.is_complete(name[: -len(_SUFFIX)]):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            self._meta.pop(name[: -len(_SUFFIX)], None)
            removed.append(name)
        if removed:
            logger.info("feature store %s: removed %d partial entries", self.root, len(removed))
        return removed

    # ------------------------------------------------------------------ writing
    def write_slide(
        self,
        slide_id: str,
        features: np.ndarray,
        coords: np.ndarray,
        attrs: dict[str, Any],
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write one slide atomically (temp dir, ``complete`` last, then rename into place).

        An existing entry for the slide (complete or not) is replaced.

        Args:
            slide_id: Slide identifier; becomes the directory name.
            features: (N, D) float16/float32 tile features (float64 is stored as float32).
            coords: (N, 2) integer level-0 (x, y) tile coordinates.
            attrs: Caller attributes (see module docstring); must be JSON-serialisable.
            extra: optional per-row arrays {name: (N, ...) int/float/bool}, read back with
                ``read_extra`` (their names are listed in the attribute ``extra_arrays``).

        Raises:
            StoreError: Bad slide id, shapes, dtypes, non-finite values or attributes.
        """
        _check_slide_id(slide_id, self.root)
        features, coords = _validate_arrays(slide_id, features, coords)
        extra = _validate_extra(slide_id, extra or {}, len(features))
        group_attrs = _group_attrs(slide_id, attrs, features.shape)
        group_attrs["extra_arrays"] = sorted(extra)
        self.root.mkdir(parents=True, exist_ok=True)
        token = f"{slide_id}-{_HOST_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        tmp = self.root / f"{_TMP_PREFIX}{token}"
        try:
            _write_group(tmp, {"features": features, "coords": coords, **extra}, group_attrs)
            self._move_into_place(tmp, self.path(slide_id), self.root / f"{_TRASH_PREFIX}{token}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self._meta.pop(slide_id, None)
        logger.debug("feature store %s: wrote slide '%s' %s", self.root, slide_id, features.shape)

    @staticmethod
    def _move_into_place(tmp: Path, final: Path, trash: Path) -> None:
        if final.exists():  # os.replace cannot replace a non-empty directory
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and coordinates of one slide.

        Returns:
            features: (N, D) float16/float32.
            coords: (N, 2) int64 level-0 (x, y).

        Raises:
            StoreError: The slide is missing, its write did not finish, or its features are
                not all finite (a corrupt chunk file).
        """
        meta = self._slide_meta(slide_id)
        return self._read_array(slide_id, meta, "features"), self._read_array(
            slide_id, meta, "coords"
        )

    def read_features(self, slide_id: str) -> np.ndarray:
        """Features of one slide, (N, D); see ``read``."""
        return self._read_array(slide_id, self._slide_meta(slide_id), "features")

    def read_coords(self, slide_id: str) -> np.ndarray:
        """Level-0 (x, y) coordinates of one slide, (N, 2) int64; see ``read``."""
        return self._read_array(slide_id, self._slide_meta(slide_id), "coords")

    def read_extra(self, slide_id: str, name: str) -> np.ndarray:
        """A per-row array written with ``write_slide(..., extra={name: ...})``: (N, ...).

        Raises:
            StoreError: the slide is missing, incomplete or has no such array.
        """
        attrs = self._require_complete(slide_id)
        if name not in (attrs.get("extra_arrays") or []):
            raise StoreError(
                f"feature store {self.root}: slide '{slide_id}' has no array '{name}' (it has "
                f"{attrs.get('extra_arrays') or 'none'}); it was extracted with other tiling "
                "settings: re-extract it, or point data.store at the right store"
            )
        chunk = _fast_meta(self.path(slide_id) / name)
        data = _read_chunk(chunk) if chunk is not None else None
        data = data if data is not None else self._read_zarr(slide_id, name)
        if data.dtype.kind == "f":
            self._check_finite(slide_id, name, data)
        return data

    def attrs(self, slide_id: str) -> dict[str, Any]:
        """Group attributes of a complete slide (see module docstring for the keys)."""
        return self._require_complete(slide_id)

    def num_instances(self, slide_id: str) -> int:
        """Number of tiles N of a complete slide."""
        attrs = self._require_complete(slide_id)
        if isinstance(attrs.get("num_instances"), int):
            return int(attrs["num_instances"])
        return int(self._array_shape(slide_id, "features")[0])

    def feature_dim(self) -> int:
        """Feature dimension D, taken from any complete slide.

        Raises:
            StoreError: The store holds no complete slide.
        """
        for slide_id in sorted(self._slide_dirs()):
            attrs = _read_group_attrs(self.path(slide_id))
            if attrs is None or attrs.get("complete") is not True:
                continue
            if isinstance(attrs.get("feature_dim"), int):
                return int(attrs["feature_dim"])
            return int(self._array_shape(slide_id, "features")[1])
        raise StoreError(
            f"feature store {self.root}: no complete slides, so the feature dimension is "
            "unknown; run `wsi extract <manifest>` or `wsi import-features` first"
        )

    def check_provenance(
        self, expected: dict[str, Any], accept_mismatch: bool = False, adding: bool = False
    ) -> dict[str, dict[str, list[str]]]:
        """Compare what every complete slide records with what the current settings would write.

        A slide counts as *extracted* when its ``extraction`` attribute records ``tiling``
        (``features.extract`` writes that); other slides were imported from other tools, and
        the configuration says nothing about how they were made: they are not compared, except
        when ``adding`` (see below). All complete slides must have one feature dimension.

        Args:
            expected: Attributes as the store records them, nested, e.g. ``{"backbone":
                "resnet18", "extraction": {"tiling": {"mpp": 0.5}}}``: what
                ``features.extract.expected_provenance`` returns. Only the keys present are
                compared; a key a slide does not record (older versions) is not.
            accept_mismatch: Log a warning instead of raising (``features.accept_store_mismatch``).
                Ignored when ``adding``.
            adding: The caller is about to write slides made with ``expected`` (extraction):
                any mismatch raises, and so do imported slides, so a store never mixes settings.

        Returns:
            The differing keys: ``{dotted key: {recorded value as JSON: [slide ids]}}``; empty
            when every slide matches.

        Raises:
            StoreError: A slide differs (unless ``accept_mismatch`` and not ``adding``), the
                store holds imported slides and ``adding``, or slides differ in feature dim.
        """
        want = _flatten(_jsonable(dict(expected)))
        diffs: dict[str, dict[str, list[str]]] = {}
        imported: list[str] = []
        dims: dict[int, list[str]] = {}
        n = 0
        for slide_id in sorted(self._slide_dirs()):
            attrs = _read_group_attrs(self.path(slide_id))
            if not attrs or attrs.get("complete") is not True:
                continue
            n += 1
            if isinstance(attrs.get("feature_dim"), int):
                dims.setdefault(attrs["feature_dim"], []).append(slide_id)
            extraction = attrs.get("extraction")
            if not (isinstance(extraction, dict) and "tiling" in extraction):
                imported.append(slide_id)
                continue
            for key, value in want.items():
                found, got = _lookup(attrs, key)
                if found and not _same(got, value):
                    diffs.setdefault(key, {}).setdefault(json.dumps(got), []).append(slide_id)
        if len(dims) > 1:
            parts = "; ".join(
                f"{d}-d: {len(ids)} slide(s) ({_some(ids)})" for d, ids in sorted(dims.items())
            )
            raise StoreError(
                f"feature store {self.root} mixes feature dimensions ({parts}): its slides were "
                "made with different backbones. Delete the slides that do not belong (their "
                f"<slide>.zarr folders in {self.root}) or the whole store, and re-extract"
            )
        if imported and adding:
            raise StoreError(
                f"feature store {self.root} holds {len(imported)} imported slide(s) "
                f"({_some(imported)}) whose backbone and tiling are not recorded, so features "
                "extracted now could not be told to match them. Import the missing slides too, "
                "leave them out of the manifest, or extract into another store (data.store=<folder>, "
                "or data.store=null for one named after the settings)"
            )
        if imported:
            logger.info("feature store %s: %d imported slide(s) not checked against the "
                        "configuration (no extraction settings recorded)", self.root, len(imported))
        if not diffs:
            return diffs
        n_bad = len({sid for by_value in diffs.values() for ids in by_value.values() for sid in ids})
        lines = [
            f"  {_setting_label(key)}: configured {json.dumps(want[key])}, recorded {value} in "
            f"{len(ids)} slide(s) ({_some(ids)})"
            for key, by_value in diffs.items()
            for value, ids in by_value.items()
        ]
        head = (f"feature store {self.root}: {n_bad} of {n} slide(s) were made with other settings "
                "than the current configuration:\n" + "\n".join(lines) + "\n")
        if adding:
            raise StoreError(
                head + "Extraction does not add slides made with other settings to a store (its "
                "features would mix). Fix: extract into another store (data.store=<folder>, or "
                "data.store=null for one named after the settings), delete "
                f"{self.root} to re-extract every slide, or go back to the recorded settings"
            )
        if accept_mismatch:
            logger.warning("%sfeatures.accept_store_mismatch=true: training on these features "
                           "anyway (config.resolved.yaml does not describe them)", head)
            return diffs
        raise StoreError(
            head + "Training on them would use the old features while config.resolved.yaml "
            "records the new settings. Fix: point data.store at another folder (or set "
            "data.store=null: the default store is named after the backbone and tiling), delete "
            f"{self.root} to re-extract it, or set features.accept_store_mismatch=true to train "
            "on these features anyway"
        )

    # ------------------------------------------------------------------ internals
    def _slide_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [
            e.name[: -len(_SUFFIX)]
            for e in self.root.iterdir()
            if e.name.endswith(_SUFFIX) and not e.name.startswith(".") and e.is_dir()
        ]

    def _require_complete(self, slide_id: str) -> dict[str, Any]:
        path = self.path(slide_id)
        attrs = _read_group_attrs(path)
        if attrs is None:
            raise StoreError(
                f"feature store {self.root}: no features for slide '{slide_id}' ({path} "
                "missing); run `wsi extract <manifest>` or `wsi import-features`"
            )
        if attrs.get("complete") is not True:
            raise StoreError(
                f"feature store {self.root}: features for slide '{slide_id}' at {path} are "
                "incomplete (an interrupted extraction); rerun `wsi extract <manifest>`, "
                "which redoes incomplete slides"
            )
        return attrs

    def _slide_meta(self, slide_id: str) -> _SlideMeta:
        meta = self._meta.get(slide_id)
        if meta is not None:
            try:
                if os.stat(self.path(slide_id)).st_ino == meta.inode:
                    return meta
            except OSError:
                pass
            self._meta.pop(slide_id, None)
        self._require_complete(slide_id)
        path = self.path(slide_id)
        meta = _SlideMeta(
            os.stat(path).st_ino, _fast_meta(path / "features"), _fast_meta(path / "coords")
        )
        self._meta[slide_id] = meta
        while len(self._meta) > self._cache_size:
            self._meta.popitem(last=False)
        return meta

    def _read_array(self, slide_id: str, meta: _SlideMeta, name: str) -> np.ndarray:
        """Every read of ``features``/``coords`` goes through here; features are checked finite."""
        chunk: _ChunkMeta | None = getattr(meta, name)
        data = _read_chunk(chunk) if chunk is not None else None
        if data is None:
            if chunk is not None:
                self._meta.pop(slide_id, None)  # changed on disk under us: take the slow path
            data = self._read_zarr(slide_id, name)
        if name == "features":
            # checked once per version of the file in this process (each DataLoader worker has
            # its own store): a corrupt file does not heal, and the check (1-3 ms for 5,000 x
            # 1,024 float16) would otherwise cost every epoch. Re-extraction writes a new
            # folder (a new inode); a file changed in place gets a new mtime / ctime.
            version = None if chunk is None else _file_version(slide_id, meta.inode, chunk.path)
            if version is None or version not in self._finite:
                self._check_finite(slide_id, name, data)
                if version is not None:
                    self._finite.add(version)
        return data

    def _check_finite(self, slide_id: str, name: str, data: np.ndarray) -> None:
        if _all_finite(data):
            return
        rows = data.reshape(len(data), -1) if data.ndim else data.reshape(1, 1)
        bad = int((~np.isfinite(rows)).any(axis=1).sum())
        path = self.path(slide_id)
        raise StoreError(
            f"feature store {self.root}: array '{name}' of slide '{slide_id}' ({path / name}) "
            f"holds NaN or inf in {bad} of {len(rows)} rows: the file is corrupt or was "
            "overwritten after it was written (the store writes finite values only). Delete "
            f"{path} and re-run extraction (`wsi extract <manifest>`, or `wsi fit`, which "
            "extracts missing slides), or re-import the slide"
        )

    def _read_zarr(self, slide_id: str, name: str) -> np.ndarray:
        import zarr

        self._require_complete(slide_id)
        path = self.path(slide_id) / name
        try:
            return np.asarray(zarr.open_array(path, mode="r")[...])
        except Exception as e:
            raise StoreError(
                f"feature store {self.root}: cannot read array '{name}' of slide '{slide_id}' "
                f"at {path} ({type(e).__name__}: {e}); rerun extraction for this slide "
                "(delete the directory first)"
            ) from e

    def _array_shape(self, slide_id: str, name: str) -> tuple[int, ...]:
        chunk = _fast_meta(self.path(slide_id) / name)
        if chunk is not None:
            return chunk.shape
        return tuple(self._read_zarr(slide_id, name).shape)


# ---------------------------------------------------------------------- helpers
def _check_slide_id(slide_id: str, root: Path) -> None:
    safe_slide_id(slide_id, where=f"feature store {root}", error=StoreError)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (an empty dict stays a leaf)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _lookup(attrs: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in nested attributes."""
    node: Any = attrs
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a: Any, b: Any) -> bool:
    """JSON values equal, numbers up to float round-off (``1`` == ``1.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _setting_label(key: str) -> str:
    """The configuration key a recorded attribute comes from, for messages."""
    if key.startswith("extraction.tiling."):
        return key[len("extraction."):]
    if key.startswith("extraction."):
        return "features." + key[len("extraction."):]
    return {"backbone": "features.backbone", "feature_dim": "feature dim",
            "weights_hash": "weights hash (features.weights / features.pretrained)"}.get(key, key)


def _some(ids: list[str], k: int = 3) -> str:
    return ", ".join(ids[:k]) + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")


def _file_version(slide_id: str, inode: int, path: str) -> tuple | None:
    """(slide, folder inode, file inode, size, mtime, ctime); None when the file is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return slide_id, inode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


_FINITE_BLOCK = 1 << 18  # elements per pass: the masked copy stays in cache (~2x a whole-array pass)


def _all_finite(data: np.ndarray) -> bool:
    """Whether a float array holds no NaN/inf. float16 by its exponent bits (all ones: inf or
    NaN), in cache-sized blocks: ~1 ms for 5,000 x 1,024 values, 3x ``np.isfinite``."""
    if data.size == 0:
        return True
    if data.dtype == np.float16:
        bits = np.ascontiguousarray(data).reshape(-1).view(np.uint16)
        buf = np.empty(min(bits.size, _FINITE_BLOCK), np.uint16)
        for i in range(0, bits.size, _FINITE_BLOCK):
            block = buf[: min(_FINITE_BLOCK, bits.size - i)]
            np.bitwise_and(bits[i:i + _FINITE_BLOCK], 0x7C00, out=block)
            if int(block.max()) == 0x7C00:
                return False
        return True
    return bool(np.isfinite(data).all())


def _validate_arrays(
    slide_id: str, features: np.ndarray, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes/dtypes/finiteness; returns C-contiguous (N, D) float and (N, 2) int64."""
    where = f"slide '{slide_id}'"
    features, coords = np.asarray(features), np.asarray(coords)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise StoreError(
            f"{where}: features must have shape (N, D) with N > 0 and D > 0, got "
            f"{features.shape}; slides without tiles must be left out of the manifest"
        )
    if features.dtype == np.float64:
        features = features.astype(np.float32)
    if features.dtype not in (np.float16, np.float32):
        raise StoreError(f"{where}: features must be float16 or float32, got {features.dtype}")
    if coords.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise StoreError(
            f"{where}: coords must have shape (N, 2) = ({features.shape[0]}, 2) to match "
            f"features {features.shape}, got {coords.shape}"
        )
    if np.issubdtype(coords.dtype, np.floating):
        if not np.all(np.isfinite(coords)) or not np.all(coords == np.round(coords)):
            raise StoreError(f"{where}: coords must be integer level-0 pixel positions")
    elif not np.issubdtype(coords.dtype, np.integer):
        raise StoreError(f"{where}: coords must be integers, got {coords.dtype}")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise StoreError(
            f"{where}: features contain NaN or inf in {bad} of {features.shape[0]} rows; check "
            "the backbone/weights (float16 overflow? use float32) and re-extract"
        )
    return np.ascontiguousarray(features), np.ascontiguousarray(coords, dtype=np.int64)


def _validate_extra(
    slide_id: str, extra: dict[str, np.ndarray], n: int
) -> dict[str, np.ndarray]:
    """Per-row arrays: names that are not the store's own, N rows, numeric, finite."""
    out = {}
    for name, value in extra.items():
        arr = np.asarray(value)
        if name in _ARRAYS or not str(name).isidentifier():
            raise StoreError(
                f"slide '{slide_id}': extra array name {name!r} must be an identifier other "
                f"than {_ARRAYS}"
            )
        if arr.ndim < 1 or len(arr) != n:
            raise StoreError(
                f"slide '{slide_id}': extra array '{name}' must have {n} rows (one per "
                f"instance), got shape {arr.shape}"
            )
        if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            raise StoreError(
                f"slide '{slide_id}': extra array '{name}' must be finite numbers or booleans, "
                f"got {arr.dtype}"
            )
        out[str(name)] = np.ascontiguousarray(arr)
    return out


def _group_attrs(slide_id: str, attrs: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {key: None for key in CALLER_ATTRS}
    out["extraction"] = {}
    for key, value in (attrs or {}).items():
        if key in STORE_ATTRS:
            continue
        try:
            out[str(key)] = _jsonable(value)
        except TypeError as e:
            raise StoreError(
                f"slide '{slide_id}': attribute '{key}' is not JSON-serialisable ({e}); pass "
                "plain numbers, strings, lists or dicts"
            ) from None
    out.update(num_instances=int(shape[0]), feature_dim=int(shape[1]))
    out["format_version"] = FORMAT_VERSION
    return out


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, Paths and bytes into JSON types."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"{type(value).__name__} value {value!r}")


def _write_group(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write the zarr group; the ``complete`` attribute goes in last."""
    import zarr

    group = zarr.open_group(path, mode="w", attributes=attrs)
    for name, data in arrays.items():
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=data.shape,
            compressors=None,
            filters=None,
            config={"write_empty_chunks": True},  # fast path expects the chunk file to exist
        )
        array[...] = data
    group.attrs.update({"complete": True})


def _read_group_attrs(path: Path) -> dict[str, Any] | None:
    """Group attributes from zarr v3 ``zarr.json`` (or v2 ``.zattrs``); None if absent."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            with open(path / name, "rb") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return {}  # unreadable metadata: present but not complete
        return dict(doc.get(key) or {}) if key else dict(doc)
    return {} if path.is_dir() else None


def _fast_meta(array_dir: Path) -> _ChunkMeta | None:
    """Chunk file + shape + dtype when the array is one raw little-endian chunk, else None."""
    try:
        with open(array_dir / "zarr.json", "rb") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    shape = tuple(meta.get("shape") or ())
    grid = meta.get("chunk_grid") or {}
    dtype = meta.get("data_type")
    codecs = meta.get("codecs") or []
    if (
        meta.get("zarr_format") != 3
        or meta.get("node_type") != "array"
        or meta.get("storage_transformers")
        or not isinstance(dtype, str)
        or dtype not in _FAST_DTYPES
        or len(shape) == 0
        or grid.get("name") != "regular"
        or tuple((grid.get("configuration") or {}).get("chunk_shape") or ()) != shape
        or len(codecs) != 1
        or codecs[0].get("name") != "bytes"
    ):
        return None
    np_dtype = np.dtype(dtype)
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if np_dtype.itemsize > 1:
        if endian != "little":
            return None
        np_dtype = np_dtype.newbyteorder("<")
    chunk = _chunk_file(array_dir, meta.get("chunk_key_encoding") or {}, len(shape))
    if chunk is None or not os.path.isfile(chunk):
        return None  # e.g. an all-fill-value chunk zarr did not write: let zarr fill it
    return _ChunkMeta(chunk, shape, np_dtype, math.prod(shape) * np_dtype.itemsize)


def _read_chunk(chunk: _ChunkMeta) -> np.ndarray | None:
    """Read a raw chunk file into a new array; None if the file is gone or has another size."""
    try:
        fd = os.open(chunk.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != chunk.nbytes:
            return None
        out = np.empty(chunk.shape, dtype=chunk.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < chunk.nbytes:  # one call unless > 2 GiB (Linux caps a read there)
            n = os.preadv(fd, [view[done:]], done)
            if n <= 0:
                return None
            done += n
        return out
    except OSError:
        return None
    finally:
        os.close(fd)


def _chunk_file(array_dir: Path, encoding: dict[str, Any], ndim: int) -> str | None:
    """Path of chunk (0, ..., 0): ``c/0/0`` (default, '/'), ``c.0.0`` or ``0.0`` (v2)."""
    name = encoding.get("name", "default")
    sep = (encoding.get("configuration") or {}).get("separator")
    if name == "default":
        sep = sep or "/"
        key = sep.join(["c"] + ["0"] * ndim)
    elif name == "v2":
        sep = sep or "."
        key = sep.join(["0"] * ndim)
    else:
        return None
    return os.path.join(array_dir, *key.split("/"))


def _host() -> str:
    """This machine's name as it appears in temp names: no ``-`` (the field separator).
    ``WSI_HOST`` overrides it, for machines (containers) that share a host name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", os.environ.get("WSI_HOST") or socket.gethostname()) or "unknown"


def _temp_owner(name: str) -> tuple[str | None, int | None]:
    """(host, pid) of a ``.tmp-/.trash-<slide>-@<host>-<pid>-<hex>.zarr`` name.

    Old names ``.tmp-<slide>-<pid>-<hex>.zarr`` have no host: (None, pid). Unparseable: (None, None).
    """
    stem = name[: -len(_SUFFIX)]
    parts = stem.rsplit("-", 3)
    if len(parts) == 4 and parts[1].startswith(_HOST_MARK) and parts[2].isdigit():
        return parts[1][len(_HOST_MARK) :], int(parts[2])
    parts = stem.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return None, int(parts[1])
    return None, None


def _in_use(entry: Path, max_age_s: float) -> bool:
    """Whether a temp/trash dir may belong to a write still in progress (so must be kept).

    This host: its process is alive. Another host: younger than ``max_age_s`` (its processes
    cannot be seen). No host in the name (older versions, one machine): its PID is alive here.
    """
    host, pid = _temp_owner(entry.name)
    if host is not None and host != _host():
        try:
            age = time.time() - entry.stat().st_mtime
        except OSError:
            return False  # gone already
        return age < max_age_s
    return pid is not None and _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (this process counts as not: its own leftovers)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
