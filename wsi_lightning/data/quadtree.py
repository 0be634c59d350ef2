"""Quadtree bags (HAG-MIL): per-level feature sets with explicit parent indices.

A quadtree slide lives in the feature store as one table of rows, every level's tiles with the
coarsest level first (``tiling.multiscale.mode=quadtree``, :func:`~wsi_lightning.slides.
multiscale.quadtree_grid`): features (sum N_l, D), coords, and the per-row arrays ``level`` and
``parent`` (index of the parent *within* level l-1). Attributes ``level_sizes``, ``level_mpp``
and ``level_extent_level0`` describe the levels.

``QuadtreeBagDataModule`` yields :class:`~wsi_lightning.data.batch.Bag` s whose ``levels`` hold
one :class:`~wsi_lightning.data.batch.LevelSet` per level (features, mask, coords, parent), so a
hierarchical method finds the children of parent p of level l as ``parent_{l+1} == p`` without
relying on HAG-MIL's ``4p .. 4p+3`` layout; the bag's own ``features`` / ``coords`` are the
finest level's, so any single-level method also runs on it. With ``level`` set it yields plain
single-level bags instead (the baselines "on the finest level alone": ``level=-1``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_lightning.data.bags import BagDataModule, BagDataset, index_and_epoch
from wsi_lightning.data.batch import Bag, LevelSet, collate_bags
from wsi_lightning.errors import ConfigError, StoreError
from wsi_lightning.manifest import Manifest
from wsi_lightning.registry import DATAMODULES


def split_levels(store, sid: str, scaler=None) -> list[dict]:
    """One slide's rows as levels: [{features (N_l, D), coords (N_l, 2), parent (N_l,)}, ...]
    (features standardised by ``scaler``, a :class:`~wsi_lightning.data.bags.FeatureScaler`, if given)."""
    attrs = store.attrs(sid)
    if attrs.get("multiscale") != "quadtree":
        raise StoreError(f"feature store {store.root}: slide '{sid}' is not a quadtree (its "
                         "multiscale attribute is {!r}); extract it with "
                         "tiling.multiscale.mode=quadtree".format(attrs.get("multiscale")))
    feats, coords = store.read(sid)  # (sum N_l, D), (sum N_l, 2)
    if scaler is not None:
        feats = scaler(feats)
    level, parent = store.read_extra(sid, "level"), store.read_extra(sid, "parent")
    sizes = [int(n) for n in attrs["level_sizes"]]
    if np.bincount(level, minlength=len(sizes)).tolist() != sizes:
        raise StoreError(f"feature store {store.root}: slide '{sid}' level array does not match "
                         f"level_sizes {sizes}; delete the slide's entry and re-extract")
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append({"features": torch.from_numpy(feats[sl]), "coords": torch.from_numpy(coords[sl]),
                    "parent": torch.from_numpy(parent[sl].astype(np.int64))})
        start += n
    return out


class QuadtreeBagDataset(BagDataset):
    """Bags of one split: all levels (``level=None``) or one level as a plain bag."""

    def __init__(self, *args, level: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.level = level

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = index_and_epoch(key, self.epoch)
        sid = self.slide_ids[i]
        levels = split_levels(self.store, sid, self.scaler)
        meta = {"slide_id": sid, "labels": {t: lab[sid] for t, lab in self.labels.items()}}
        if self.level is not None:
            try:
                lv = levels[self.level]
            except IndexError:
                raise ConfigError(f"data.multiscale.scale={self.level} but slide '{sid}' has "
                                  f"{len(levels)} quadtree levels (0 = coarsest, -1 = finest)") from None
            feats, coords = lv["features"], lv["coords"]
            keep = self.subset(len(feats), i, epoch)
            if keep is not None:
                feats, coords = feats[keep], coords[keep]
            return {"features": feats, "coords": coords, **meta}
        attrs = self.store.attrs(sid)
        for lv, ext, mpp in zip(levels, attrs["level_extent_level0"], attrs["level_mpp"], strict=True):
            lv["extent"], lv["mpp"] = int(ext), float(mpp)
        return {"features": levels[-1]["features"], "coords": levels[-1]["coords"], "levels": levels, **meta}


def collate_quadtree(items: list[dict]) -> Bag:
    """Pad the finest level as the bag, and every level into a :class:`LevelSet`."""
    bag = collate_bags(items)
    if "levels" not in items[0]:
        return bag
    n_levels = len(items[0]["levels"])
    if any(len(it["levels"]) != n_levels for it in items):
        raise StoreError("a batch mixes slides with different numbers of quadtree levels; "
                         "re-extract them with one tiling.multiscale.levels")
    bag.levels = []
    for lvl in range(n_levels):
        sets = [it["levels"][lvl] for it in items]
        sub = collate_bags([{**s, "slide_id": it["slide_id"], "labels": it["labels"]}
                            for s, it in zip(sets, items, strict=True)])
        parent = torch.full(sub.mask.shape, -1, dtype=torch.int64)  # (B, N_l)
        for b, s in enumerate(sets):
            parent[b, : len(s["parent"])] = s["parent"]
        bag.levels.append(LevelSet(sub.features, sub.mask, sub.coords, parent, sets[0]["extent"], sets[0]["mpp"]))
    return bag


@DATAMODULES.register("quadtree_bags")
class QuadtreeBagDataModule(BagDataModule):
    """Quadtree bags, one per slide (``data.bag_level=case`` is refused at config time: the
    parent indices and levels are per slide).

    Args (beyond :class:`BagDataModule`'s):
        level: None yields every level (``Bag.levels``); an int yields that level alone as a
            plain bag (0 = coarsest, -1 = finest).
    """

    layout = "quadtree"
    input_kinds = ("bag", "quadtree")
    bag_levels = ("slide",)  # one bag per slide: data.bag_level=case is refused at config time

    @classmethod
    def check_config(cls, cfg: Any, input_kind: str) -> None:
        ms = cfg.data.multiscale
        if str(ms.mode) != "stack" or int(ms.scale) != 0:
            raise ConfigError(f"data.multiscale.mode={ms.mode} / scale={ms.scale} apply to concentric stores; "
                              "on a quadtree store the view is data.quadtree.level (null: every level, "
                              "for hierarchical methods; an int: one level as a plain bag, 0 = coarsest, "
                              "-1 = finest)")
        level = cfg.data.quadtree.level
        if input_kind == "quadtree" and level is not None:
            raise ConfigError(f"a method taking quadtree input reads every level; the config has "
                              f"data.quadtree.level={level}: set data.quadtree.level=null")
        if input_kind != "quadtree" and level is None:
            raise ConfigError(f"a method taking {input_kind} input on a quadtree store reads one level; "
                              "set data.quadtree.level (0 = coarsest, -1 = finest)")

    @classmethod
    def from_config(cls, cfg: Any, manifest: Manifest, store: str | Path,
                    prepare: Callable[[], object] | None = None) -> QuadtreeBagDataModule:
        level = cfg.data.quadtree.level
        return cls(manifest, store, level=None if level is None else int(level), **cls.common_kwargs(cfg, prepare))

    def __init__(self, *args, level: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.level = level

    @property
    def in_dim(self) -> int:
        return self.store.feature_dim()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        for name, ds in list(self.datasets.items()):
            self.datasets[name] = QuadtreeBagDataset(ds.store, ds.slide_ids, ds.labels,
                                                     max_bag_size=ds.max_bag_size, scaler=ds.scaler,
                                                     seed=ds.seed, level=self.level)

    collate = staticmethod(collate_quadtree)
