"""Quadtree bags: per-level sets with parent indices, single-level views, store checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_quadtree_bags
from wsi_lightning.manifest import load_manifest
from wsi_lightning.data.quadtree import QuadtreeBagDataModule, collate_quadtree, split_levels
from wsi_lightning.errors import StoreError
from wsi_lightning.features.store import FeatureStore


@pytest.fixture
def qt_data(tmp_path: Path) -> Path:
    return make_quadtree_bags(tmp_path, n_slides=8)


def test_levels_batch_keeps_parents_and_padding(qt_data: Path):
    m = load_manifest(qt_data, "label", check_files=False)
    dm = QuadtreeBagDataModule(m, qt_data.parent / "store", split={"val": 0.25, "test": 0.25}, batch_size=2)
    dm.setup()
    bag = next(iter(dm.train_dataloader()))
    assert bag.levels is not None and len(bag.levels) == 3
    torch.testing.assert_close(bag.features, bag.levels[-1].features)  # the bag is the finest level
    for lvl in (1, 2):
        lv, up = bag.levels[lvl], bag.levels[lvl - 1]
        for b in range(len(bag)):
            p = lv.parent[b][lv.mask[b]]
            assert (p >= 0).all() and (p < up.mask[b].sum()).all()
            off = lv.coords[b][lv.mask[b]] - up.coords[b][p]
            assert ((off == 0) | (off == lv.extent)).all()
            assert (lv.parent[b][~lv.mask[b]] == -1).all()
    assert bag.levels[0].extent == 2 * bag.levels[1].extent


def test_select_one_level_gives_plain_bags(qt_data: Path):
    m = load_manifest(qt_data, "label", check_files=False)
    dm = QuadtreeBagDataModule(m, qt_data.parent / "store", split={"val": 0.25, "test": 0.25}, level=0)
    dm.setup()
    bag = next(iter(dm.test_dataloader()))
    assert bag.levels is None
    sid = bag.slide_ids[0]
    assert bag.mask.sum() == split_levels(dm.store, sid)[0]["features"].shape[0]


def test_children_found_by_parent_not_position(tmp_path: Path):
    """Dropped children (min_child_tissue) leave fewer than 4 per parent: parents stay explicit."""
    store = FeatureStore(tmp_path / "s")
    coarse = np.array([[0, 0], [200, 0]])
    fine = np.array([[0, 0], [100, 100], [300, 0]])  # parent 0 keeps 2 children, parent 1 one
    store.write_slide("a", np.ones((5, 4), np.float32), np.concatenate([coarse, fine]),
                      {"multiscale": "quadtree", "level_sizes": [2, 3], "level_mpp": [2.0, 1.0],
                       "level_extent_level0": [200, 100]},
                      extra={"level": np.array([0, 0, 1, 1, 1]), "parent": np.array([-1, -1, 0, 0, 1])})
    levels = split_levels(store, "a")
    for lv, ext, mpp in zip(levels, [200, 100], [2.0, 1.0], strict=True):
        lv["extent"], lv["mpp"] = ext, mpp
    bag = collate_quadtree([{"features": levels[-1]["features"], "coords": levels[-1]["coords"],
                             "levels": levels, "slide_id": "a", "labels": {"label": 1}}])
    assert bag.levels[1].parent.tolist() == [[0, 0, 1]]


def test_store_errors_name_slide_and_fix(tmp_path: Path):
    store = FeatureStore(tmp_path / "s")
    store.write_slide("plain", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), {})
    with pytest.raises(StoreError, match="'plain' is not a quadtree"):
        split_levels(store, "plain")
    with pytest.raises(StoreError, match="has no array 'parent'"):
        store.read_extra("plain", "parent")
    with pytest.raises(StoreError, match="must have 3 rows"):
        store.write_slide("bad", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), {},
                          extra={"parent": np.zeros(2)})
