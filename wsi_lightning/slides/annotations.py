"""Lesion annotations (GeoJSON, QuPath convention) and tile ground truth derived from them.

An annotation file is a GeoJSON FeatureCollection of Polygon / MultiPolygon features in level-0
pixel coordinates (QuPath's other export shapes are read too: a bare JSON array of features, one
Feature, or a bare geometry). QuPath *detections* are not annotations and are skipped: features
whose ``properties.objectType`` (or the older ``object_type``) is ``detection``, ``cell`` or
``tile``, or whose QuPath 0.2 ``id`` names one of those classes, e.g. the tiles ``wsi
export-qupath`` writes, which share a file with the tissue annotation. Which of the other
features are lesions is decided by their classification name
(``properties.classification.name``, or a plain string there), case-insensitively:

* unclassified features and every other name (``Tumor``, ``tumour``, ``metastasis``...) are
  lesions; Camelyon16's converted annotations (:mod:`wsi_lightning.data.camelyon16`) write
  ``Tumor``;
* ``Exclusion`` regions are subtracted: each becomes a hole of the lesions that contain it
  (polygon holes are not lesion either);
* names in :data:`NON_LESION_CLASSES` or starting with one of :data:`NON_LESION_PREFIXES` are not
  lesions: the demo's decoys (``Decoy-architecture``, ``Decoy-cells``), zoom-task
  ``Candidate`` regions, QuPath's default non-tumour classes (``Stroma``, ``Necrosis``,
  ``Other``, ``Immune cells``, ``Ignore*``, ``Region*``) and ``Tissue`` (the outline ``wsi
  export-qupath`` writes). :func:`load_regions` returns the polygons of any named classes, e.g.
  the candidates.

A slide's annotation is found through the manifest's ``annotation`` column, else
``<manifest folder>/annotations/<slide_id>.geojson`` (the demo data's layout).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.path import Path as MplPath

from wsi_lightning.errors import WSIError

log = logging.getLogger(__name__)

TILE_RULES = ("centre", "overlap")
EXCLUSION_CLASS = "exclusion"
# classification names (lower case) that are not lesions; every other name, or none, is a lesion
NON_LESION_CLASSES = frozenset({"candidate", "stroma", "necrosis", "other", "immune cells", "tissue"})
NON_LESION_PREFIXES = ("decoy", "ignore", "region")
# QuPath object types that are detections (PathDetectionObject and its subclasses), not drawn regions
DETECTION_TYPES = frozenset({"detection", "cell", "tile"})
_LEGACY_DETECTION_IDS = frozenset({"PathDetectionObject", "PathCellObject", "PathTileObject"})  # QuPath 0.2


@dataclass
class Lesion:
    """One lesion polygon: exterior (K, 2) and holes, level-0 (x, y)."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    def contains(self, pts: np.ndarray) -> np.ndarray:
        """(P, 2) points -> (P,) bool inside the exterior and outside every hole."""
        inside = MplPath(self.exterior).contains_points(pts)
        for h in self.holes:
            inside &= ~MplPath(h).contains_points(pts)
        return inside


def is_lesion_class(name: str | None) -> bool:
    """Whether features classified ``name`` are lesions (see the module docstring); None or ""
    (unclassified) is a lesion, ``Exclusion`` is not (it is subtracted from the lesions)."""
    n = (name or "").strip().lower()
    if not n:
        return True
    return n != EXCLUSION_CLASS and n not in NON_LESION_CLASSES and not n.startswith(NON_LESION_PREFIXES)


def _class_name(feature: dict) -> str:
    """A feature's classification name, lower case ("" when unclassified)."""
    cls = (feature.get("properties") or {}).get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    return str(cls or "").strip().lower()


def is_detection(feature: dict) -> bool:
    """Whether a GeoJSON feature is a QuPath detection (``objectType`` detection / cell / tile, the
    older ``object_type``, or a QuPath 0.2 ``id`` naming a detection class), not an annotation."""
    props = feature.get("properties")
    props = props if isinstance(props, dict) else {}
    kind = props.get("objectType", props.get("object_type"))
    if isinstance(kind, str) and kind.strip().lower() in DETECTION_TYPES:
        return True
    return feature.get("id") in _LEGACY_DETECTION_IDS


def _features(gj: object, path: Path, what: str = "annotation") -> list[dict]:
    """The annotation features of any shape QuPath exports: a FeatureCollection, a bare JSON
    array of features ("Export objects as JSON array"), one Feature, or a bare Polygon /
    MultiPolygon; detections (:func:`is_detection`) are left out. ``what`` names the file in errors."""
    if isinstance(gj, list):
        items = gj
    elif isinstance(gj, dict) and gj.get("type") == "FeatureCollection":
        items = gj.get("features") or []
    elif isinstance(gj, dict) and gj.get("type") == "Feature":
        items = [gj]
    elif isinstance(gj, dict) and gj.get("type") in ("Polygon", "MultiPolygon"):
        items = [{"type": "Feature", "geometry": gj, "properties": {}}]
    else:
        found = gj.get("type") if isinstance(gj, dict) else type(gj).__name__
        raise WSIError(f"{what} {path}: not GeoJSON features (top level: {found!r}); expected a "
                       "FeatureCollection, a Feature, a JSON array of features (QuPath's export) or a "
                       "Polygon / MultiPolygon, in level-0 pixels")
    bad = [i for i, f in enumerate(items) if not isinstance(f, dict)]
    if bad:
        raise WSIError(f"{what} {path}: entry {bad[0]} of its features is a "
                       f"{type(items[bad[0]]).__name__}, not a GeoJSON Feature object; fix or remove the file")
    return [f for f in items if not is_detection(f)]


def read_polygons(path: str | Path) -> list[tuple[str, list[np.ndarray]]]:
    """Every polygon of a GeoJSON file as (lower-case class name, rings): rings[0] the exterior,
    the rest its holes, each (K, 2) level-0 (x, y). Non-polygon geometries are skipped.

    Raises:
        WSIError: the file cannot be read or is not JSON (the message names it).
    """
    path = Path(path)
    try:
        gj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WSIError(
            f"annotation {path}: cannot read GeoJSON ({e}); fix or remove the file"
        ) from e
    return polygons_of(gj, path)


def polygons_of(gj: object, path: str | Path, what: str = "annotation") -> list[tuple[str, list[np.ndarray]]]:
    """:func:`read_polygons` of GeoJSON already parsed (``path`` and ``what`` name it in errors)."""
    out = []
    for f in _features(gj, Path(path), what):
        geom = f.get("geometry") or {}
        polys = (
            [geom["coordinates"]]
            if geom.get("type") == "Polygon"
            else geom.get("coordinates", [])
            if geom.get("type") == "MultiPolygon"
            else []
        )
        name = _class_name(f)
        for rings in polys:
            arrs = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings if len(r) >= 3]
            if arrs:
                out.append((name, arrs))
    return out


def load_lesions(path: str | Path) -> list[Lesion]:
    """Read the lesion polygons of a GeoJSON file: features whose class is a lesion class
    (:func:`is_lesion_class`), with ``Exclusion`` regions subtracted as holes."""
    lesions, exclusions = [], []
    for name, arrs in read_polygons(path):
        if name == EXCLUSION_CLASS:
            exclusions.append(arrs[0])
        elif is_lesion_class(name):
            lesions.append(Lesion(arrs[0], arrs[1:]))
    for ex in exclusions:  # exclusion regions become holes of the lesions that contain them
        for les in lesions:
            if MplPath(les.exterior).contains_points(ex[:1]).all():
                les.holes.append(ex)
    return lesions


def load_regions(path: str | Path, classes: str | Iterable[str]) -> list[Lesion]:
    """The polygons of the given classes (names matched case-insensitively, e.g. ``"Candidate"``
    or ``["Decoy-architecture", "Decoy-cells"]``), each with its own holes; exclusions are not
    subtracted. ``""`` selects unclassified features."""
    wanted = {classes.strip().lower()} if isinstance(classes, str) else {c.strip().lower() for c in classes}
    return [Lesion(arrs[0], arrs[1:]) for name, arrs in read_polygons(path) if name in wanted]


def in_lesions(pts: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """(P, 2) level-0 points -> (P,) bool inside any lesion. Only the points within a lesion's
    bounding box are tested against its polygon."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for les in lesions:
        lo, hi = les.exterior.min(0), les.exterior.max(0)
        near = np.flatnonzero(((pts >= lo) & (pts <= hi)).all(1))
        if near.size:
            inside[near] |= les.contains(pts[near])
    return inside


def find_annotation(row: pd.Series, manifest_source: Path) -> Path | None:
    """The annotation file of a manifest row, or None if the slide has none."""
    val = row.get("annotation") if "annotation" in row else None
    if isinstance(val, str) and val.strip():
        p = Path(val)
        return p if p.is_absolute() else manifest_source.parent / p
    sid = row["slide_id"] if "slide_id" in row else row.name  # a row of a slide_id-indexed frame
    cand = manifest_source.parent / "annotations" / f"{sid}.geojson"
    return cand if cand.exists() else None


def lesion_outlines(row: pd.Series, manifest_source: Path, who: str = "annotations") -> list[np.ndarray]:
    """Level-0 exteriors of a manifest row's lesions, for drawing; [] when the slide has no
    annotation, or (with a warning naming ``who`` and the slide) when its file is unreadable."""
    path = find_annotation(row, Path(manifest_source))
    if path is None or not path.exists():
        return []
    try:
        return [les.exterior for les in load_lesions(path)]
    except WSIError as e:
        sid = row["slide_id"] if "slide_id" in row else row.name
        log.warning("%s: %s; no outlines for '%s'", who, e, sid)
        return []


def tile_labels(
    coords: np.ndarray,
    extent: float,
    lesions: list[Lesion],
    rule: str = "centre",
    min_overlap: float = 0.5,
    grid: int = 8,
) -> np.ndarray:
    """Tile ground truth from lesion polygons.

    Args:
        coords: (N, 2) level-0 top-left corners of square tiles.
        extent: tile side in level-0 pixels.
        lesions: the slide's lesions (empty: every tile is 0).
        rule: ``centre``: 1 if the tile centre lies in a lesion; ``overlap``: 1 if at least
            ``min_overlap`` of the tile's area does (estimated on a ``grid`` x ``grid`` lattice
            of points at the centres of equal sub-squares).
        min_overlap: area fraction for ``overlap``.

    Returns:
        (N,) bool.
    """
    if rule not in TILE_RULES:
        raise ValueError(f"tile-label rule '{rule}'; expected one of {list(TILE_RULES)}")
    n = len(coords)
    if not lesions or n == 0:
        return np.zeros(n, dtype=bool)
    if rule == "centre":
        offs = np.array([[0.5, 0.5]])
    else:
        g = (np.arange(grid) + 0.5) / grid
        offs = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)  # (G*G, 2)
    pts = (coords[:, None, :] + offs[None] * extent).reshape(-1, 2)  # (N*G*G, 2)
    frac = in_lesions(pts, lesions).reshape(n, len(offs)).mean(1)
    return frac >= (0.5 if rule == "centre" else min_overlap)
