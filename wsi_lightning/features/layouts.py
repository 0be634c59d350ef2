"""Store layouts: how each ``tiling.multiscale.mode`` tiles a slide, reads a row and names its store.

Extraction (:mod:`wsi_lightning.features.extract`) and the store path (``build.store_path``)
ask the slide's layout instead of branching on the mode; a new input form that needs its own
tiling adds one class here and registers it in :data:`LAYOUTS`:

    none         one row per tile at ``tiling.mpp``                        (T, T, 3) per row
    concentric   one row per location, S windows of ``context`` x the tile  (S, T, T, 3) per row
                 sharing its centre, each resized to T (CS-MIL)
    quadtree     one row per tile of every level, coarsest level first,    (T, T, 3) per row
                 with per-row ``level`` and ``parent`` arrays (HAG-MIL)

Each layout states the ``tiling.multiscale`` keys it reads (``keys``: recorded as the store's
provenance and part of its folder name), builds the slide's grid from the tissue mask, rebuilds
it from the cached arrays, and turns grid and tiles into a
:class:`~wsi_lightning.features.extract.TilePlan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from wsi_lightning.errors import ConfigError, WSIError


class StoreLayout:
    """Plain tiles (``tiling.multiscale.mode=none``); the base of the multi-scale layouts.

    Args:
        tiling: the ``tiling:`` config section (a plain mapping).
    """

    mode: ClassVar[str] = "none"
    keys: ClassVar[tuple[str, ...]] = ()  # the tiling.multiscale keys this layout reads

    def __init__(self, tiling: Mapping[str, Any]) -> None:
        self.tiling = tiling
        self.ms: Mapping[str, Any] = tiling.get("multiscale") or {}
        self.tile_size, self.mpp = int(tiling["tile_size"]), float(tiling["mpp"])
        self.min_tissue = float(tiling["min_tissue"])

    # ------------------------------------------------------------------ names
    def cache_key(self) -> str:
        """The tile cache's key: a cached tiling made with other settings is redone."""
        # v2: large holes kept; the trailing "()" keeps caches written before layouts valid
        return f"v2_{self.tile_size}px_{self.tiling['mpp']}mpp_{self.tiling['min_tissue']}_()"

    def store_suffix(self) -> str:
        """Appended to ``<backbone>_<T>px_<mpp>mpp`` in the default store folder name."""
        return ""

    def provenance(self) -> dict[str, Any]:
        """The ``extraction.tiling.multiscale`` entry a store records for this layout."""
        return {"mode": self.mode, **{k: self.ms[k] for k in self.keys if k in self.ms}}

    # ------------------------------------------------------------------ grids
    def grid(self, reader: Any, tissue: Any) -> Any:
        """The slide's multi-scale grid from its tissue mask (None for plain tiles)."""
        return None

    def grid_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The grid again from the tile cache's ``ms_*`` arrays (None for plain tiles)."""
        return None

    def plan_fields(self, coords: np.ndarray, attrs: dict[str, Any], grid: Any
                    ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray] | None]:
        """(rows' level-0 coords, store attributes, per-row store arrays) of one slide."""
        return coords, attrs, None

    # ------------------------------------------------------------------ reading
    def read(self, reader: Any, plan: Any, t: int) -> np.ndarray:
        """Row ``t`` of the slide as uint8 pixels ((T, T, 3); concentric (S, T, T, 3))."""
        x, y = (int(v) for v in plan.coords[t])
        size = int(plan.attrs["tile_size"])
        return reader.read_at_mpp((x, y), (size, size), float(plan.attrs["mpp"]))

    def blank_shape(self, plan: Any) -> tuple[int, ...]:
        """The (C, T, T) shape (concentric (S, C, T, T)) of a row whose read failed."""
        size = int(plan.attrs["tile_size"])
        return (3, size, size)


class ConcentricLayout(StoreLayout):
    """Concentric windows of ``tiling.multiscale.context`` x the tile around each tile's centre."""

    mode = "concentric"
    keys = ("context",)

    def __init__(self, tiling: Mapping[str, Any]) -> None:
        super().__init__(tiling)
        self.context = tuple(float(c) for c in self.ms.get("context", ()))

    def cache_key(self) -> str:
        return super().cache_key()[:-2] + f"{self.context}"

    def store_suffix(self) -> str:
        return "_concentric" + "-".join(f"{c:g}" for c in self.context)

    def grid(self, reader: Any, tissue: Any) -> Any:
        from wsi_lightning.slides.multiscale import concentric_grid

        return concentric_grid(reader, self.tile_size, self.mpp, self.context, min_tissue=self.min_tissue,
                               tissue=tissue)

    def grid_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
        from wsi_lightning.slides.multiscale import grid_from_arrays

        return grid_from_arrays(arrays)

    def plan_fields(self, coords, attrs, grid):
        attrs = {**attrs, "scales": int(grid.n_scales), "context": [float(c) for c in grid.context],
                 "scale_mpp": [float(m) for m in grid.scale_mpp], "window_um": [float(w) for w in grid.window_um],
                 "multiscale": "concentric"}
        return coords, attrs, None

    def read(self, reader, plan, t):
        return plan.grid.read(reader, t)

    def blank_shape(self, plan):
        size = int(plan.attrs["tile_size"])
        return (int(plan.grid.n_scales), 3, size, size)


class QuadtreeLayout(StoreLayout):
    """A tissue quadtree of ``tiling.multiscale.levels`` levels; ``tiling.mpp`` is the finest."""

    mode = "quadtree"
    keys = ("levels", "min_child_tissue")

    def __init__(self, tiling: Mapping[str, Any]) -> None:
        super().__init__(tiling)
        self.level_mpps = quadtree_mpps(tiling)
        mct = self.ms.get("min_child_tissue")
        self.min_child_tissue = None if mct is None else float(mct)

    def cache_key(self) -> str:
        return super().cache_key() + f"_qt{(self.level_mpps, self.ms.get('min_child_tissue'))}"

    def store_suffix(self) -> str:
        mct = self.ms.get("min_child_tissue")
        return f"_quadtree{len(self.level_mpps)}" + ("" if mct is None else f"-child{mct:g}")

    def grid(self, reader: Any, tissue: Any) -> Any:
        from wsi_lightning.slides.multiscale import quadtree_grid

        return quadtree_grid(reader, self.tile_size, self.level_mpps, min_tissue=self.min_tissue, tissue=tissue,
                             min_child_tissue=self.min_child_tissue)

    def grid_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
        from wsi_lightning.slides.multiscale import grid_from_arrays

        return grid_from_arrays(arrays)

    def plan_fields(self, coords, attrs, grid):
        rows, level, parent = grid.rows()
        # the tile attributes describe the finest level (the bag a single-level method sees)
        attrs = {**attrs, "mpp": grid.mpp[-1], "tile_size": grid.tile_size,
                 "tile_size_um": grid.window_um[-1], "extent_level0": grid.extent_level0[-1],
                 "multiscale": "quadtree", "level_sizes": list(grid.level_sizes),
                 "level_mpp": list(grid.mpp), "level_extent_level0": list(grid.extent_level0),
                 "level_window_um": list(grid.window_um)}
        return rows, attrs, {"level": level, "parent": parent}

    def read(self, reader, plan, t):
        return plan.grid.read_row(reader, t)  # (T, T, 3) at its level's mpp


LAYOUTS: dict[str, type[StoreLayout]] = {c.mode: c for c in (StoreLayout, ConcentricLayout, QuadtreeLayout)}


def layout_for(tiling: Mapping[str, Any]) -> StoreLayout:
    """The layout of ``tiling.multiscale.mode`` (``none`` when the section is absent)."""
    mode = str((tiling.get("multiscale") or {}).get("mode", "none"))
    if mode not in LAYOUTS:
        raise ConfigError(f"tiling.multiscale.mode={mode!r}; expected one of {list(LAYOUTS)}")
    return LAYOUTS[mode](tiling)


def quadtree_mpps(tiling: Mapping[str, Any]) -> tuple[float, ...]:
    """Quadtree level mpps, coarsest first: ``tiling.mpp`` is the finest, each level up doubles."""
    levels = int((tiling.get("multiscale") or {}).get("levels", 3))
    if levels < 1:
        raise WSIError(f"tiling.multiscale.levels={levels}; expected an integer >= 1")
    return tuple(float(tiling["mpp"]) * 2 ** (levels - 1 - lvl) for lvl in range(levels))
