"""Regions as polygons: a drawn region of interest (ROI) rasterised onto a tissue mask, and a
tissue mask turned into level-0 polygons (shapely), for tiling and for the QuPath export.

An ROI file (manifest column ``roi``, alias ``tissue_mask``) is either

* a GeoJSON file of annotations drawn in QuPath, in level-0 pixels (any shape
  :mod:`wsi_lightning.slides.annotations` reads; detections are ignored): the region is the
  union of every polygon (holes kept), minus the ``Exclusion`` polygons; or
* a mask image (``.png``, ``.tif``, ``.tiff``) covering the whole slide at any downsample (the
  same one along x and y): a nonzero pixel (any colour channel; an alpha channel is ignored) is
  inside.

:func:`apply_roi` intersects the slide's tissue mask with the ROI, rasterised on the mask's own
grid (a mask pixel is inside when its centre is), so every tiling rule keeps working unchanged:
a tile is kept when its tissue *inside the ROI* covers ``tiling.min_tissue`` of it. Errors name
the manifest row (``where``), the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from wsi_lightning.errors import ManifestError, NoTissueError, WSIError
from wsi_lightning.slides.tissue import TissueMask

ROI_GEOJSON = (".geojson", ".json")
ROI_IMAGES = (".png", ".tif", ".tiff")
ROI_SUFFIXES = ROI_GEOJSON + ROI_IMAGES
_ASPECT_RTOL = 0.02  # a mask's width may differ this much from the slide's aspect ratio (rounding)


def roi_digest(path: str | Path, where: str) -> str:
    """The first 16 hex digits of the file's SHA-256: what tile caches and stores record."""
    path = Path(path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        raise ManifestError(f"{where}: roi file {path} does not exist; fix the 'roi' column (relative "
                            "paths are relative to the manifest's folder) or empty the cell to tile all "
                            "the tissue") from None
    except OSError as e:
        raise ManifestError(f"{where}: roi file {path} cannot be read ({e}); check its permissions") from None


def read_roi_geometry(path: str | Path, where: str):
    """The region of a GeoJSON ROI as one valid shapely (Multi)Polygon in level-0 pixels.

    Raises:
        ManifestError: unreadable or not GeoJSON features, or no polygon area in it.
    """
    import shapely

    from wsi_lightning.slides.annotations import EXCLUSION_CLASS, polygons_of

    path = Path(path)
    again = ("export the region again from QuPath (File > Export objects as GeoJSON, in level-0 pixels) "
             "or give a mask image (PNG / TIFF) instead")
    try:
        gj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where}: roi file {path}: cannot read GeoJSON ({e}); {again}") from None
    try:
        polys = polygons_of(gj, path, what="roi file")
    except WSIError as e:
        raise ManifestError(f"{where}: {e}; {again}") from None
    inside = [_polygon(rings) for name, rings in polys if name != EXCLUSION_CLASS]
    outside = [_polygon(rings) for name, rings in polys if name == EXCLUSION_CLASS]
    geom = shapely.union_all(inside) if inside else shapely.Polygon()
    if outside:
        geom = geom.difference(shapely.union_all(outside))
    geom = _polygonal(geom)
    if geom.is_empty or geom.area <= 0:
        found = ("no Polygon / MultiPolygon annotation in it" if not polys else
                 f"{len(inside)} polygon(s), nothing left once the {len(outside)} Exclusion polygon(s) are cut out")
        raise ManifestError(
            f"{where}: roi file {path} has no polygon area ({found}); draw the region as an area "
            "annotation (polygon, rectangle or brush) in QuPath and export it again; points, lines "
            "and detections are not regions")
    return geom


def read_roi_image(path: str | Path, where: str) -> np.ndarray:
    """A mask image as (h, w) bool, True inside (nonzero in any colour channel).

    Raises:
        ManifestError: unreadable, or no pixel inside.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same bad input
        raise ManifestError(f"{where}: roi image {path} cannot be read ({type(e).__name__}: {e}); save "
                            "the mask as a PNG or TIFF (nonzero = inside)") from None
    img = np.squeeze(img)
    if img.ndim == 3 and img.shape[-1] in (2, 4):
        img = img[..., :-1]  # (grey | RGB) + alpha: the alpha channel says nothing about the region
    mask = img != 0 if img.ndim == 2 else (img != 0).any(-1) if img.ndim == 3 else None
    if mask is None:
        raise ManifestError(f"{where}: roi image {path} has shape {img.shape}; expected a 2-D mask "
                            "(grey or colour) covering the whole slide")
    if not mask.any():
        raise ManifestError(f"{where}: roi image {path} is empty (every pixel is 0), so nothing would be "
                            "tiled; nonzero pixels mark the region to keep")
    return mask


def roi_on_grid(path: str | Path, tissue: TissueMask, slide_size: tuple[int, int], slide_mpp: float,
                where: str) -> np.ndarray:
    """The ROI on the tissue mask's grid: (h, w) bool, True where a mask pixel's centre is inside.

    Args:
        path: the ROI file (GeoJSON or mask image, see the module docstring).
        tissue: the slide's tissue mask (its grid: ``tissue.mask.shape`` at ``tissue.mpp``).
        slide_size: level-0 (width, height) of the slide.
        slide_mpp: level-0 µm/px.
        where: the manifest row, for errors.
    """
    path = Path(path)
    if path.suffix.lower() not in ROI_SUFFIXES:
        raise ManifestError(f"{where}: roi file {path} has suffix {path.suffix!r}; expected GeoJSON "
                            f"({', '.join(ROI_GEOJSON)}) or a mask image ({', '.join(ROI_IMAGES)})")
    roi_digest(path, where)  # a missing file is named the same way everywhere
    scale = slide_mpp / tissue.mpp  # mask px per level-0 px
    if path.suffix.lower() in ROI_GEOJSON:
        return rasterize(read_roi_geometry(path, where), tissue.mask.shape, scale)
    img = read_roi_image(path, where)
    (w0, h0), (h, w) = slide_size, img.shape
    ds_x, ds_y = w0 / w, h0 / h  # level-0 px per ROI pixel
    if abs(w - w0 / ds_y) > max(1.0, _ASPECT_RTOL * w):  # one downsample, up to rounding of the size
        raise ManifestError(
            f"{where}: roi image {path} is {w} x {h} px but the slide is {w0} x {h0} px: not the same "
            f"downsample along x ({ds_x:.3g}) and y ({ds_y:.3g}); the mask must cover the whole slide "
            "(export it from QuPath at one downsample, or resize it keeping the slide's aspect ratio)")
    mh, mw = tissue.mask.shape
    cx = (np.arange(mw) + 0.5) / scale  # level-0 x of each mask column centre
    cy = (np.arange(mh) + 0.5) / scale
    ix = np.clip((cx / ds_x).astype(np.int64), 0, w - 1)
    iy = np.clip((cy / ds_y).astype(np.int64), 0, h - 1)
    out = img[np.ix_(iy, ix)]
    out[:, cx >= w0] = False  # mask pixels past the slide's edge
    out[cy >= h0] = False
    return out


def apply_roi(tissue: TissueMask, path: str | Path, slide_size: tuple[int, int], slide_mpp: float,
              where: str) -> TissueMask:
    """The tissue mask restricted to the ROI (same grid and thumbnail).

    Raises:
        ManifestError: a bad ROI file (see :func:`roi_on_grid`). NoTissueError: no tissue inside it.
    """
    roi = roi_on_grid(path, tissue, slide_size, slide_mpp, where)
    mask = tissue.mask & roi
    if not mask.any():
        raise NoTissueError(
            f"{where}: the roi {path} holds no tissue ({roi.mean():.1%} of the slide is inside it, "
            f"{tissue.tissue_fraction:.1%} is tissue); check that it was drawn on this slide, in level-0 "
            "pixels (QuPath's full-resolution coordinates)")
    return TissueMask(mask=mask, mpp=tissue.mpp, thumbnail=tissue.thumbnail)


def rasterize(geom, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Pixels of a grid whose centres lie inside a (Multi)Polygon (even-odd rule over its rings,
    which for a valid polygon is its interior minus its holes).

    Args:
        geom: shapely Polygon / MultiPolygon in level-0 pixels.
        shape: (h, w) of the grid; pixel (i, j) covers level-0 [j, j+1) / scale x [i, i+1) / scale.
        scale: grid pixels per level-0 pixel.

    Returns:
        (h, w) bool.
    """
    h, w = shape
    out = np.zeros((h, w), bool)
    rings = [np.asarray(r.coords, np.float64)[:, :2] * scale
             for p in _parts(geom) for r in (p.exterior, *p.interiors)]
    if not rings:
        return out
    seg = np.concatenate([np.stack([r[:-1], r[1:]], 1) for r in rings])  # (E, 2 ends, 2)
    seg = seg[seg[:, 0, 1] != seg[:, 1, 1]]  # horizontal edges cross no row centre
    (x1, y1), (x2, y2) = seg[:, 0].T, seg[:, 1].T
    lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
    r0 = np.ceil(lo - 0.5).astype(np.int64)  # rows i with lo <= i + 0.5 < hi: half-open, so a
    r1 = np.ceil(hi - 0.5).astype(np.int64)  # vertex shared by two edges is counted once
    r0c, r1c = np.clip(r0, 0, h), np.clip(r1, 0, h)
    n = np.maximum(r1c - r0c, 0)
    if not n.any():
        return out
    e = np.repeat(np.arange(len(seg)), n)  # one entry per (edge, row) crossing
    row = r0c[e] + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
    yc = row + 0.5
    x = x1[e] + (yc - y1[e]) * (x2[e] - x1[e]) / (y2[e] - y1[e])
    order = np.lexsort((x, row))  # by row, then x: crossings pair up within each row
    row, x = row[order], x[order]
    a, b = x[0::2], x[1::2]  # inside from a to b: pixels whose centre j + 0.5 is in [a, b)
    j0 = np.clip(np.ceil(a - 0.5), 0, w).astype(np.int64)
    j1 = np.clip(np.ceil(b - 0.5), 0, w).astype(np.int64)
    acc = np.zeros((h, w + 1), np.int32)
    np.add.at(acc, (row[0::2], j0), 1)
    np.add.at(acc, (row[0::2], j1), -1)
    return np.cumsum(acc[:, :w], axis=1) > 0


def mask_polygons(mask: np.ndarray, scale: float, simplify: float = 1.0):
    """A boolean mask as one valid (Multi)Polygon in level-0 pixels (the union of its pixels).

    Args:
        mask: (h, w) bool; pixel (i, j) covers level-0 [j, j+1) * scale x [i, i+1) * scale.
        scale: level-0 pixels per mask pixel.
        simplify: Douglas-Peucker tolerance in mask pixels (0: the exact staircase outline).

    Returns:
        shapely Polygon / MultiPolygon (empty when the mask is).
    """
    import shapely

    mask = np.asarray(mask, bool)
    d = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # (h, w + 1)
    (row, x0), (_, x1) = np.nonzero(d == 1), np.nonzero(d == -1)  # runs, row by row, in order
    if not len(row):
        return shapely.Polygon()
    order = np.lexsort((row, x1, x0))  # equal runs in consecutive rows become one rectangle
    row, x0, x1 = row[order], x0[order], x1[order]
    new = np.ones(len(row), bool)
    new[1:] = (x0[1:] != x0[:-1]) | (x1[1:] != x1[:-1]) | (row[1:] != row[:-1] + 1)
    first, last = np.flatnonzero(new), np.r_[np.flatnonzero(new)[1:], len(row)] - 1
    boxes = shapely.box(x0[first], row[first], x1[first], row[last] + 1)  # (G,) rectangles
    geom = shapely.union_all(boxes)
    if simplify > 0:
        geom = geom.simplify(simplify, preserve_topology=True)
    geom = shapely.transform(geom, lambda c: c * scale)
    return _polygonal(geom)


def geojson_geometry(geom) -> dict:
    """A (Multi)Polygon as an RFC 7946 geometry: closed rings, exteriors counter-clockwise and
    holes clockwise (the right-hand rule), plain lists of floats."""
    import shapely

    parts = [shapely.orient_polygons(p, exterior_cw=False) for p in _parts(geom)]
    rings = [[[[float(x), float(y)] for x, y in np.asarray(r.coords)[:, :2]] for r in (p.exterior, *p.interiors)]
             for p in parts]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings[0]}
    return {"type": "MultiPolygon", "coordinates": rings}


def _polygon(rings: list[np.ndarray]):
    """A valid shapely geometry from an exterior and holes (self-intersections repaired)."""
    import shapely

    return shapely.make_valid(shapely.Polygon(rings[0], rings[1:]))


def _polygonal(geom):
    """The polygon parts of a geometry, made valid, as a Polygon / MultiPolygon."""
    import shapely

    geom = shapely.make_valid(geom)
    parts = [p for p in _parts(geom) if p.area > 0]
    if not parts:
        return shapely.Polygon()
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _parts(geom) -> list:
    """The Polygons of a Polygon, MultiPolygon or GeometryCollection (other types dropped)."""
    if geom is None or geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if geom.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [p for g in geom.geoms for p in _parts(g)]
    return []
