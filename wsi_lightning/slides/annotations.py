"""Lesion annotations (GeoJSON, QuPath convention) and tile ground truth derived from them.

An annotation file is a GeoJSON FeatureCollection of Polygon / MultiPolygon features in level-0
pixel coordinates; features classified "Exclusion" (or whose polygons are holes) are removed
from the lesion area. A slide's annotation is found through the manifest's ``annotation``
column, else ``<manifest folder>/annotations/<slide_id>.geojson`` (the demo data's layout).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.path import Path as MplPath

from wsi_lightning.errors import WSIError

log = logging.getLogger(__name__)

TILE_RULES = ("centre", "overlap")


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


def load_lesions(path: str | Path) -> list[Lesion]:
    """Read the lesion polygons of a GeoJSON file (exclusion features are subtracted)."""
    path = Path(path)
    try:
        gj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WSIError(
            f"annotation {path}: cannot read GeoJSON ({e}); fix or remove the file"
        ) from e
    feats = gj.get("features", []) if gj.get("type") == "FeatureCollection" else [gj]
    lesions, exclusions = [], []
    for f in feats:
        geom = f.get("geometry") or {}
        cls = (((f.get("properties") or {}).get("classification") or {}).get("name") or "").lower()
        polys = (
            [geom["coordinates"]]
            if geom.get("type") == "Polygon"
            else geom.get("coordinates", [])
            if geom.get("type") == "MultiPolygon"
            else []
        )
        for rings in polys:
            arrs = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings if len(r) >= 3]
            if not arrs:
                continue
            if cls == "exclusion":
                exclusions.append(arrs[0])
            else:
                lesions.append(Lesion(arrs[0], arrs[1:]))
    for ex in exclusions:  # exclusion regions become holes of the lesions that contain them
        for les in lesions:
            if MplPath(les.exterior).contains_points(ex[:1]).all():
                les.holes.append(ex)
    return lesions


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
    inside = np.zeros(len(pts), dtype=bool)
    for les in lesions:
        inside |= les.contains(pts)
    frac = inside.reshape(n, len(offs)).mean(1)
    return frac >= (0.5 if rule == "centre" else min_overlap)
