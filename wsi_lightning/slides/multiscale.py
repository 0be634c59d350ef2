"""Multi-scale windows aligned in level-0 coordinates: concentric (CS-MIL) and quadtree (HAG-MIL).

Every window is a level-0 pixel box (x0, y0, w, h) plus the microns per pixel it is read at, so
scales are defined physically, never by pyramid level numbers: a cohort mixing 0.25 and 0.5 µm/px
scans gives the same windows in microns (the 0.25 µm/px boxes are twice as large in level-0 px).

- ``concentric_grid`` (CS-MIL, docs/methods.md §3.2): for every tissue tile of ``tile_size`` px at
  ``mpp``, windows of ``f * tile_size`` px at ``mpp`` for each context factor f, all sharing the
  tile's centre and each resized to ``tile_size`` px (so read at ``f * mpp`` µm/px).
- ``quadtree_grid`` (HAG-MIL, docs/methods.md §2.1): tissue tiles at the coarsest mpp; each finer level
  (half the mpp) splits every parent into its 4 quarter-area children.

Windows reaching past the slide edge keep their true box and are read with padding; they are never
clipped or dropped unless a tissue threshold asks for it. Both grids round-trip through a dict of
numpy arrays (``to_arrays`` / ``from_arrays``), e.g. ``np.savez(path, **grid.to_arrays())`` and
``QuadtreeGrid.from_arrays(np.load(path))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from wsi_lightning.errors import ConfigError, NoTissueError, StoreError
from wsi_lightning.slides.reader import SlideReader
from wsi_lightning.slides.tiling import tile_slide
from wsi_lightning.slides.tissue import TissueMask, segment_tissue

PadValue = int | tuple[int, int, int]
# HAG-MIL child order (docs/methods.md §2.1, create_quadtree_wsis.py): (x, y), (x, y+s), (x+s, y),
# (x+s, y+s) with x the column, in level-0 px; rows are (dx, dy) multiples of the child extent s.
CHILD_OFFSETS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.int64)  # (4, 2)


def read_window(
    reader: SlideReader,
    location: tuple[int, int],
    size: int,
    mpp: float,
    pad_value: PadValue = 255,
) -> np.ndarray:
    """Read a square window at a physical resolution, padding what lies outside the slide.

    Args:
        reader: the slide.
        location: (x, y) top-left in level-0 pixels (may be negative or past the edge).
        size: output side in pixels.
        mpp: output microns per pixel.
        pad_value: grey level or RGB triple of every output pixel whose centre lies outside the
            slide (white by default, as the reader pads).

    Returns:
        (size, size, 3) uint8 RGB.
    """
    pad = _pad_rgb(pad_value)
    x0, y0 = int(location[0]), int(location[1])
    img = reader.read_at_mpp((x0, y0), (size, size), mpp)
    centre = (np.arange(size) + 0.5) * (mpp / reader.mpp)  # (size,) level-0 offsets
    width, height = reader.dimensions
    out_x = (x0 + centre < 0) | (x0 + centre >= width)  # (size,) columns outside
    out_y = (y0 + centre < 0) | (y0 + centre >= height)  # (size,) rows outside
    if out_x.any() or out_y.any():
        img = np.array(img)  # writable copy
        img[out_y] = pad
        img[:, out_x] = pad
    return img


def _pad_rgb(pad_value: PadValue) -> np.ndarray:
    arr = np.asarray(pad_value)
    if arr.shape not in ((), (3,)) or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"pad_value must be an int or an (r, g, b) triple, got {pad_value!r}")
    if arr.min() < 0 or arr.max() > 255:
        raise ConfigError(f"pad_value must lie in 0..255, got {pad_value!r}")
    return np.broadcast_to(arr, (3,)).astype(np.uint8)


def _check_reader(reader: SlideReader, slide_mpp: float, what: str) -> None:
    if not math.isclose(reader.mpp, slide_mpp, rel_tol=1e-6):
        raise ConfigError(
            f"slide {reader.path}: this {what} was built for a {slide_mpp:g} µm/px slide but "
            f"the reader reports {reader.mpp:g} µm/px; rebuild the grid for this slide (or pass "
            "the same mpp override to SlideReader)"
        )


def _check_size(name: str, tile_size: int) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ConfigError(f"{name}: tile_size must be a positive integer, got {tile_size!r}")


def _check_mpp(name: str, key: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: {key} must be a positive number of µm/px, got {value!r}")


def _check_fraction(name: str, key: str, value: float | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or not 0 <= value <= 1:
        raise ConfigError(f"{name}: {key} must be a tissue fraction in [0, 1], got {value!r}")


def _get(d: Mapping[str, np.ndarray], key: str, kind: str) -> np.ndarray:
    if key not in d:
        raise StoreError(
            f"{kind} arrays lack the key {key!r} (have {sorted(d)}); the cached grid is partial "
            "or from another version: delete it and rebuild"
        )
    return np.asarray(d[key])


def _check_kind(d: Mapping[str, np.ndarray], kind: str) -> None:
    found = str(_get(d, "kind", kind))
    if found != kind:
        raise StoreError(f"arrays hold a {found!r} grid, not a {kind!r} grid")


# -- concentric windows (CS-MIL) --------------------------------------------------------------
@dataclass(eq=False)
class ConcentricGrid:
    """Concentric multi-scale windows around the tiles of one slide (CS-MIL, docs/methods.md §3.2).

    Attributes:
        centres: (N, 2) float64 level-0 (x, y) centre shared by all the windows of tile i.
        boxes: (N, S, 4) int64 level-0 (x0, y0, w, h) of each window; boxes may extend past the
            slide (read padded), and ``boxes[..., :2] + boxes[..., 2:] / 2 == centres[:, None]``.
        out_size: output side in pixels of every scale (= the base tile_size).
        context: (S,) float64 scale factors f (window side = f * tile_size px at base_mpp).
        scale_mpp: (S,) float64 µm/px of each scale after resizing to out_size (= base_mpp * f).
        window_um: (S,) float64 window side in microns (= out_size * scale_mpp).
        slide_mpp: level-0 µm/px of the slide.
        base_mpp: µm/px of the base tiles.
        tissue_fraction: (N,) float32 tissue fraction of each base tile.
    """

    centres: np.ndarray
    boxes: np.ndarray
    out_size: int
    context: np.ndarray
    scale_mpp: np.ndarray
    window_um: np.ndarray
    slide_mpp: float
    base_mpp: float
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.centres)

    @property
    def n_scales(self) -> int:
        return len(self.context)

    def read(self, reader: SlideReader, i: int, pad_value: PadValue = 255) -> np.ndarray:
        """Pixels of every window of tile `i`, each read at its own mpp.

        Returns:
            (S, out_size, out_size, 3) uint8 RGB, scales in ``context`` order.
        """
        _check_reader(reader, self.slide_mpp, "concentric grid")
        return np.stack(
            [
                read_window(reader, self.boxes[i, s, :2], self.out_size, m, pad_value)
                for s, m in enumerate(self.scale_mpp.tolist())
            ]
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (``np.savez``-able without pickle)."""
        return {
            "kind": np.array("concentric"),
            "centres": self.centres,
            "boxes": self.boxes,
            "out_size": np.array(self.out_size, np.int64),
            "context": self.context,
            "scale_mpp": self.scale_mpp,
            "window_um": self.window_um,
            "slide_mpp": np.array(self.slide_mpp, np.float64),
            "base_mpp": np.array(self.base_mpp, np.float64),
            "tissue_fraction": self.tissue_fraction,
        }

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> ConcentricGrid:
        """Inverse of ``to_arrays`` (accepts an ``np.load`` result)."""
        kind = "concentric"
        _check_kind(d, kind)
        n, s = len(_get(d, "centres", kind)), len(_get(d, "context", kind))
        if _get(d, "boxes", kind).shape != (n, s, 4):
            raise StoreError(
                f"concentric arrays: boxes {_get(d, 'boxes', kind).shape} do not match {n} "
                f"centres x {s} scales; delete the cached grid and rebuild"
            )
        return cls(
            centres=_get(d, "centres", kind).astype(np.float64),
            boxes=_get(d, "boxes", kind).astype(np.int64),
            out_size=int(_get(d, "out_size", kind)),
            context=_get(d, "context", kind).astype(np.float64),
            scale_mpp=_get(d, "scale_mpp", kind).astype(np.float64),
            window_um=_get(d, "window_um", kind).astype(np.float64),
            slide_mpp=float(_get(d, "slide_mpp", kind)),
            base_mpp=float(_get(d, "base_mpp", kind)),
            tissue_fraction=_get(d, "tissue_fraction", kind).astype(np.float32),
        )


def concentric_grid(
    reader: SlideReader,
    tile_size: int,
    mpp: float,
    context: Sequence[float] = (1, 2, 4),
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
) -> ConcentricGrid:
    """Concentric windows around every tissue tile (CS-MIL's 256 px at 20x + 512 and 1024 px at
    20x resized to 256, i.e. ``tile_size=256, mpp=0.5, context=(1, 2, 4)``).

    The base tiles are ``tile_slide(reader, tile_size, mpp, min_tissue, tissue)``. The window of
    factor f covers ``f * extent_level0`` level-0 px, rounded to the nearest size of the same
    parity as ``extent_level0`` so that its centre is exactly the base tile's centre (at most one
    level-0 px from ``f * extent_level0``; exact for the usual even extents). Unlike CS-MIL's
    tiler (fixed −128/−384 px offsets, off-centre on native 20x scans), windows are always
    centred explicitly.

    Args:
        reader: the slide.
        tile_size: output side in pixels of the base tile and of every scale.
        mpp: µm/px of the base tiles.
        context: scale factors f > 0, distinct (scale s is read at ``mpp * context[s]``).
        min_tissue: tissue fraction a base tile needs (0 keeps every grid tile).
        tissue: precomputed mask (default: ``segment_tissue(reader)``).

    Returns:
        ConcentricGrid with N base tiles (row-major) and S = len(context) scales.

    Raises:
        ConfigError: invalid sizes, mpp or context. NoTissueError: no tile has enough tissue.
    """
    name = "concentric_grid"
    _check_size(name, tile_size)
    _check_mpp(name, "mpp", mpp)
    factors = np.asarray(tuple(context), np.float64)
    if factors.ndim != 1 or not len(factors) or not (np.isfinite(factors) & (factors > 0)).all():
        raise ConfigError(
            f"{name}: context must be scale factors > 0, e.g. (1, 2, 4); got {context!r}"
        )
    if len(np.unique(factors)) != len(factors):
        raise ConfigError(f"{name}: context factors must be distinct, got {context!r}")
    grid = tile_slide(reader, tile_size, mpp, min_tissue=min_tissue, tissue=tissue)
    extent = grid.extent_level0
    widths = np.array([extent + 2 * round((f - 1) * extent / 2) for f in factors], np.int64)
    if (widths < 1).any():
        raise ConfigError(
            f"{name}: context {tuple(context)} gives windows under one level-0 pixel for "
            f"{tile_size} px tiles at {mpp} µm/px; use larger factors"
        )
    offset = (widths - extent) // 2  # (S,) exact: widths - extent is even
    top_left = grid.coords[:, None, :] - offset[None, :, None]  # (N, S, 2)
    sizes = np.broadcast_to(widths[None, :, None], top_left.shape)  # (N, S, 2)
    return ConcentricGrid(
        centres=grid.coords.astype(np.float64) + extent / 2,
        boxes=np.concatenate([top_left, sizes], axis=-1).astype(np.int64),  # (N, S, 4)
        out_size=int(tile_size),
        context=factors,
        scale_mpp=float(mpp) * factors,
        window_um=float(tile_size) * float(mpp) * factors,
        slide_mpp=float(grid.slide_mpp),
        base_mpp=float(mpp),
        tissue_fraction=grid.tissue_fraction,
    )


# -- quadtree (HAG-MIL) -----------------------------------------------------------------------
@dataclass(eq=False)
class QuadtreeGrid:
    """A tissue quadtree: level 0 is the coarsest, each level has half the mpp of the previous.

    Our level index l follows ``level_mpps`` (0 = coarsest), unlike HAG-MIL's/OpenSlide's level
    numbers (HAG-MIL's coarsest is "level 2"). Per level l (lists of length L):

    Attributes:
        coords: (N_l, 2) int64 level-0 top-left (x, y).
        parent: (N_l,) int64 index into level l-1 (-1 at level 0).
        quadrant: (N_l,) int64 position among its siblings in HAG-MIL order 0..3 = (x, y),
            (x, y+s), (x+s, y), (x+s, y+s) (-1 at level 0).
        tissue_fraction: (N_l,) float32.
        extent_level0: side in level-0 px of level l's windows (exactly halving per level).
        mpp: µm/px level l is read at.
        tile_size: output side in pixels at every level.
        slide_mpp: level-0 µm/px of the slide.
    """

    coords: list[np.ndarray]
    parent: list[np.ndarray]
    quadrant: list[np.ndarray]
    tissue_fraction: list[np.ndarray]
    extent_level0: tuple[int, ...]
    mpp: tuple[float, ...]
    tile_size: int
    slide_mpp: float
    _children: list[tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.mpp)
        lists = (self.coords, self.parent, self.quadrant, self.tissue_fraction, self.extent_level0)
        if n < 1 or any(len(a) != n for a in lists):
            raise ValueError(f"quadtree needs {n} entries per level in every field")
        # children of level l as CSR over the explicit parent array: order, starts (N_l + 1,)
        self._children = []
        for lvl in range(1, n):
            par, n_parents = self.parent[lvl], len(self.coords[lvl - 1])
            if len(par) and (par.min() < 0 or par.max() >= n_parents):
                raise ValueError(f"quadtree level {lvl}: parent index outside 0..{n_parents - 1}")
            order = np.argsort(par, kind="stable")  # keeps HAG-MIL order among siblings
            starts = np.concatenate([[0], np.cumsum(np.bincount(par, minlength=n_parents))])
            self._children.append((order.astype(np.int64), starts))

    @property
    def n_levels(self) -> int:
        return len(self.mpp)

    @property
    def window_um(self) -> tuple[float, ...]:
        """Window side in microns per level (= tile_size * mpp[l])."""
        return tuple(self.tile_size * m for m in self.mpp)

    def __len__(self) -> int:
        return len(self.coords[0])

    def boxes(self, level: int) -> np.ndarray:
        """(N_l, 4) int64 level-0 (x0, y0, w, h) of level `level`."""
        c = self.coords[level]
        return np.concatenate([c, np.full_like(c, self.extent_level0[level])], axis=1)

    def children(self, level: int, p: int) -> np.ndarray:
        """Indices at level ``level + 1`` of the children of tile `p` of level `level`, in
        HAG-MIL order (fewer than 4 if ``min_child_tissue`` dropped some)."""
        if not 0 <= level < self.n_levels - 1:
            raise IndexError(
                f"level {level} has no children; levels with children: 0..{self.n_levels - 2}"
            )
        order, starts = self._children[level]
        if not 0 <= p < len(starts) - 1:
            raise IndexError(f"level {level} has {len(starts) - 1} tiles; got index {p}")
        return order[starts[p] : starts[p + 1]]

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """(N_0, ..., N_{L-1}) tiles per level."""
        return tuple(len(c) for c in self.coords)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every level's tiles as one table, coarsest level first (the feature-store layout).

        Returns:
            coords: (sum N_l, 2) int64 level-0 top-left.
            level: (sum N_l,) int64 level of each row.
            parent: (sum N_l,) int64 index of the row's parent *within its level* l-1 (-1 at
                level 0), so ``rows of level l-1`` [parent] is the parent.
        """
        level = np.concatenate([np.full(n, lvl, np.int64) for lvl, n in enumerate(self.level_sizes)])
        return np.concatenate(self.coords), level, np.concatenate(self.parent)

    def read_row(self, reader: SlideReader, row: int, pad_value: PadValue = 255) -> np.ndarray:
        """Pixels of row `row` of :meth:`rows` (read at its own level's mpp)."""
        offsets = np.cumsum(self.level_sizes)
        level = int(np.searchsorted(offsets, row, side="right"))
        return self.read(reader, level, row - (int(offsets[level - 1]) if level else 0), pad_value)

    def child_table(self, level: int) -> np.ndarray:
        """(N_l, 4) int64: column q is the level+1 index of quadrant q of each tile, -1 if dropped."""
        table = np.full((len(self.coords[level]), 4), -1, np.int64)
        child = np.arange(len(self.parent[level + 1]))
        table[self.parent[level + 1], self.quadrant[level + 1]] = child
        return table

    def read(
        self, reader: SlideReader, level: int, i: int, pad_value: PadValue = 255
    ) -> np.ndarray:
        """Pixels of tile `i` of level `level`. Returns (tile_size, tile_size, 3) uint8 RGB."""
        _check_reader(reader, self.slide_mpp, "quadtree grid")
        return read_window(
            reader, self.coords[level][i], self.tile_size, self.mpp[level], pad_value
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (``np.savez``-able without pickle); per-level keys end in ``_{l}``."""
        out = {
            "kind": np.array("quadtree"),
            "mpp": np.asarray(self.mpp, np.float64),
            "extent_level0": np.asarray(self.extent_level0, np.int64),
            "window_um": np.asarray(self.window_um, np.float64),
            "tile_size": np.array(self.tile_size, np.int64),
            "slide_mpp": np.array(self.slide_mpp, np.float64),
        }
        for lvl in range(self.n_levels):
            out[f"coords_{lvl}"] = self.coords[lvl]
            out[f"parent_{lvl}"] = self.parent[lvl]
            out[f"quadrant_{lvl}"] = self.quadrant[lvl]
            out[f"tissue_fraction_{lvl}"] = self.tissue_fraction[lvl]
        return out

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> QuadtreeGrid:
        """Inverse of ``to_arrays`` (accepts an ``np.load`` result)."""
        kind = "quadtree"
        _check_kind(d, kind)
        levels = range(len(_get(d, "mpp", kind)))

        def per_level(key: str, dtype: type) -> list[np.ndarray]:
            return [_get(d, f"{key}_{lvl}", kind).astype(dtype) for lvl in levels]

        try:
            return cls(
                coords=[c.reshape(-1, 2) for c in per_level("coords", np.int64)],
                parent=per_level("parent", np.int64),
                quadrant=per_level("quadrant", np.int64),
                tissue_fraction=per_level("tissue_fraction", np.float32),
                extent_level0=tuple(int(e) for e in _get(d, "extent_level0", kind)),
                mpp=tuple(float(m) for m in _get(d, "mpp", kind)),
                tile_size=int(_get(d, "tile_size", kind)),
                slide_mpp=float(_get(d, "slide_mpp", kind)),
            )
        except ValueError as err:
            raise StoreError(f"inconsistent quadtree arrays ({err}); delete and rebuild") from err


def grid_from_arrays(d: Mapping[str, np.ndarray]) -> ConcentricGrid | QuadtreeGrid:
    """``ConcentricGrid`` or ``QuadtreeGrid`` from ``to_arrays`` output, by its ``kind``."""
    kind = str(_get(d, "kind", "multi-scale grid"))
    if kind == "concentric":
        return ConcentricGrid.from_arrays(d)
    if kind == "quadtree":
        return QuadtreeGrid.from_arrays(d)
    raise StoreError(f"unknown multi-scale grid kind {kind!r}; delete the cached grid and rebuild")


def _check_level_mpps(level_mpps: Sequence[float]) -> tuple[float, ...]:
    name = "quadtree_grid"
    mpps = tuple(level_mpps)
    if not mpps:
        raise ConfigError(f"{name}: level_mpps must list at least one mpp, e.g. (2.0, 1.0, 0.5)")
    for m in mpps:
        _check_mpp(name, "level_mpps", m)
    for coarse, fine in zip(mpps[:-1], mpps[1:], strict=True):
        if not math.isclose(fine, coarse / 2, rel_tol=1e-6):
            raise ConfigError(
                f"{name}: level_mpps {mpps} must halve at each level (coarsest first: a child "
                f"covers a quarter of its parent); {fine} is not {coarse} / 2 = {coarse / 2}"
            )
    return tuple(float(m) for m in mpps)


def _coarse_tiles(
    reader: SlideReader, extent: int, tissue: TissueMask, min_tissue: float, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Row-major grid of `extent` level-0 px from (0, 0) (as ``tile_slide``), tissue-filtered.

    Returns:
        ((N, 2) int64 top-left coords, (N,) float32 tissue fractions).
    """
    width, height = reader.dimensions
    ys, xs = np.meshgrid(np.arange(0, height, extent), np.arange(0, width, extent), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)  # (N, 2)
    fraction = tissue.fractions(
        np.concatenate([coords, np.full_like(coords, extent)], 1), reader.mpp
    )
    keep = fraction >= min_tissue
    if not keep.any():
        raise NoTissueError(
            f"slide {reader.path}: no {what} tile has >= {min_tissue:.0%} tissue "
            f"({tissue.tissue_fraction:.1%} of the thumbnail is tissue); lower tiling.min_tissue or "
            "tiling.tile_size, or check the tissue mask (<store>/tiles/qc/<slide>.png)"
        )
    return coords[keep], fraction[keep]


def quadtree_grid(
    reader: SlideReader,
    tile_size: int,
    level_mpps: Sequence[float] = (2.0, 1.0, 0.5),
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
    min_child_tissue: float | None = None,
) -> QuadtreeGrid:
    """HAG-MIL's quadtree of tiles (docs/methods.md §2.1, create_quadtree_wsis.py).

    Level 0 is a regular grid of ``tile_size`` px tiles at ``level_mpps[0]`` on tissue (kept if
    their tissue fraction is >= `min_tissue`). Each finer level splits every parent at level-0
    (x, y) into 4 children of ``tile_size`` px at half the mpp, in HAG-MIL's order (x, y),
    (x, y+s), (x+s, y), (x+s, y+s), x the column and s the child's level-0 extent (docs/methods.md §2.1 step 2
    and §2.10). HAG-MIL keeps all 4 children (its index contract ``N_{l+1} = 4 N_l``), including
    those reaching past the slide edge (read padded); `min_child_tissue` optionally drops
    children below a tissue fraction, and with them their descendants. ``parent`` is explicit
    either way, so consumers never need the ``4p..4p+3`` arithmetic.

    Extents halve exactly in level-0 px: the finest is ``round(tile_size * level_mpps[-1] /
    slide_mpp)`` and level l's is that times ``2**(L-1-l)``, so children tile their parent
    exactly; on slides whose mpp does not divide evenly, coarse boxes may differ from
    ``tile_slide``'s rounding by up to ``2**(L-2)`` level-0 px (same relative error at all levels).

    Args:
        reader: the slide.
        tile_size: output side in pixels at every level (256 in HAG-MIL).
        level_mpps: µm/px per level, coarsest first, each exactly half the previous (HAG-MIL on
            40x Camelyon16: about (1.0, 0.5, 0.25), i.e. 10x, 20x, 40x).
        min_tissue: tissue fraction a coarsest-level tile needs.
        tissue: precomputed mask (default: ``segment_tissue(reader)``).
        min_child_tissue: if set, drop children (and their subtrees) below this tissue fraction.

    Returns:
        QuadtreeGrid with L = len(level_mpps) levels.

    Raises:
        ConfigError: invalid sizes or mpps. NoTissueError: no coarse tile has enough tissue.
    """
    name = "quadtree_grid"
    _check_size(name, tile_size)
    mpps = _check_level_mpps(level_mpps)
    _check_fraction(name, "min_tissue", min_tissue)
    _check_fraction(name, "min_child_tissue", min_child_tissue, optional=True)
    finest = round(tile_size * mpps[-1] / reader.mpp)
    if finest < 1:
        raise ConfigError(
            f"slide {reader.path}: a {tile_size} px tile at {mpps[-1]} µm/px is smaller than one "
            f"pixel of this {reader.mpp} µm/px slide; use a larger tile_size or finer level_mpps"
        )
    extents = tuple(finest * 2 ** (len(mpps) - 1 - lvl) for lvl in range(len(mpps)))
    tissue = segment_tissue(reader) if tissue is None else tissue
    what = f"{tile_size} px at {mpps[0]} µm/px"
    coords, fraction = _coarse_tiles(reader, extents[0], tissue, min_tissue, what)
    none = np.full(len(coords), -1, np.int64)
    levels = [(coords, none, none.copy(), fraction)]
    for s in extents[1:]:
        par_coords = levels[-1][0]
        child = par_coords[:, None, :] + CHILD_OFFSETS[None] * s  # (P, 4, 2)
        child = child.reshape(-1, 2)  # (4P, 2) parent-major, HAG-MIL order within
        parent = np.repeat(np.arange(len(par_coords), dtype=np.int64), 4)  # (4P,)
        quadrant = np.tile(np.arange(4, dtype=np.int64), len(par_coords))  # (4P,)
        frac = tissue.fractions(np.concatenate([child, np.full_like(child, s)], 1), reader.mpp)
        keep = np.ones(len(child), bool) if min_child_tissue is None else frac >= min_child_tissue
        levels.append((child[keep], parent[keep], quadrant[keep], frac[keep]))
    return QuadtreeGrid(
        coords=[lv[0] for lv in levels],
        parent=[lv[1] for lv in levels],
        quadrant=[lv[2] for lv in levels],
        tissue_fraction=[lv[3].astype(np.float32) for lv in levels],
        extent_level0=extents,
        mpp=mpps,
        tile_size=int(tile_size),
        slide_mpp=float(reader.mpp),
    )
