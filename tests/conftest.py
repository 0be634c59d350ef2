"""Shared fixtures: tiny synthetic feature bags (no slides needed) and a config factory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# Tests never write demo data or features into the repository's data/ folder.
os.environ["WSI_DATA_ROOT"] = tempfile.mkdtemp(prefix="wsi_test_data_")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent


def make_feature_bags(root: Path, n_slides: int = 24, dim: int = 16, seed: int = 0,
                      n_range: tuple[int, int] = (20, 60), n_classes: int = 2) -> Path:
    """A feature store + manifest where class-c bags carry a few 'key' instances.

    Class c > 0 bags hold 2-4 instances shifted along feature axis c; class 0 bags none.
    Two slides per case for the first cases (to exercise patient-level splits).
    Returns the manifest path; the store is ``root / "store"``.
    """
    from wsi_lightning.features.store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore(root / "store")
    rows = []
    for i in range(n_slides):
        paired = i < 8  # cases c000-c003 own two slides each, with one label
        label = (i // 2) % n_classes if paired else i % n_classes
        n = int(rng.integers(*n_range))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        if label > 0:
            k = int(rng.integers(2, 5))
            feats[:k, label] += 4.0
            rng.shuffle(feats)
        coords = np.stack([np.arange(n) * 112, np.zeros(n)], 1).astype(np.int64)
        sid = f"s{i:03d}"
        store.write_slide(sid, feats.astype(np.float16), coords,
                          {"mpp": 0.5, "tile_size": 112, "tile_size_um": 56.0, "level": 0,
                           "extent_level0": 112, "backbone": "synthetic", "weights_hash": "none",
                           "extraction": {}})
        case = f"c{i // 2:03d}" if paired else f"c{i:03d}"
        rows.append({"slide_id": sid, "case_id": case, "path": f"slides/{sid}.tiff",
                     "label": f"class{label}"})
    df = pd.DataFrame(rows)
    path = root / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def make_case_bags(root: Path, n_cases: int = 32, dim: int = 16, seed: int = 0,
                   slides_per_case: tuple[int, int] = (2, 3), n_range: tuple[int, int] = (15, 30),
                   columns: int = 6) -> Path:
    """A feature store + manifest of patients with 2-3 slides each (``case_id`` shared by a
    case's slides, ``cNNN``; slides ``cNNN_sK``), for ``data.bag_level=case``.

    Cases alternate class0 / class1 and every slide carries its case's label. In a class1
    case exactly one slide, at random, holds 3-5 'key' instances shifted +4 along feature
    axis 1; its other slides look like class0 slides. So a case is positive when any of its
    slides carries the signal (a slide-level model sees positive slides without it). Each
    slide lies on its own grid (level-0 x, y = 112 px x column, row; ``columns`` per row), so
    the slides of a case share coordinates. Returns the manifest path; the store is
    ``root / "store"``.
    """
    from wsi_lightning.features.store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore(root / "store")
    rows = []
    for c in range(n_cases):
        label = c % 2
        n_slides = int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))
        carrier = int(rng.integers(n_slides)) if label else -1
        for k in range(n_slides):
            n = int(rng.integers(*n_range))
            feats = rng.normal(size=(n, dim)).astype(np.float32)
            if k == carrier:
                feats[: int(rng.integers(3, 6)), 1] += 4.0
                rng.shuffle(feats)
            coords = np.stack([np.arange(n) % columns, np.arange(n) // columns], 1).astype(np.int64) * 112
            sid = f"c{c:03d}_s{k}"
            store.write_slide(sid, feats.astype(np.float16), coords,
                              {"mpp": 0.5, "tile_size": 112, "tile_size_um": 56.0, "level": 0,
                               "extent_level0": 112, "backbone": "synthetic", "weights_hash": "none",
                               "extraction": {}})
            rows.append({"slide_id": sid, "case_id": f"c{c:03d}", "path": f"slides/{sid}.tiff",
                         "label": f"class{label}", "carrier": k == carrier})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def make_quadtree_bags(root: Path, n_slides: int = 12, dim: int = 16, seed: int = 0,
                       n_coarse: tuple[int, int] = (3, 7), levels: int = 3) -> Path:
    """A quadtree feature store (HAG-MIL layout) + manifest.

    Each slide has ``n_coarse`` coarse tiles on a row and all 4 children per level (HAG-MIL
    order). In class-1 slides one coarse tile is a 'lesion': its descendants at the finest level
    carry +3 on feature axis 1, the coarse tile itself only +1 (a weak low-magnification cue).
    Returns the manifest path; the store is ``root / "store"``.
    """
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.slides.multiscale import CHILD_OFFSETS

    rng = np.random.default_rng(seed)
    store = FeatureStore(root / "store")
    ext = [64 * 2 ** (levels - 1 - lvl) for lvl in range(levels)]
    rows = []
    for i in range(n_slides):
        label = i % 2
        n0 = int(rng.integers(*n_coarse))
        coords = [np.stack([np.arange(n0) * ext[0], np.zeros(n0)], 1).astype(np.int64)]
        parents, lesion = [np.full(n0, -1)], [np.zeros(n0, bool)]
        if label:
            lesion[0][int(rng.integers(n0))] = True
        for lvl in range(1, levels):
            up = coords[-1]
            coords.append((up[:, None] + CHILD_OFFSETS[None] * ext[lvl]).reshape(-1, 2))
            parents.append(np.repeat(np.arange(len(up)), 4))
            lesion.append(np.repeat(lesion[-1], 4))
        feats = []
        for lvl in range(levels):
            f = rng.normal(size=(len(coords[lvl]), dim)).astype(np.float32)
            f[lesion[lvl], 1] += 3.0 if lvl == levels - 1 else 1.0
            feats.append(f)
        sizes = [len(c) for c in coords]
        store.write_slide(f"q{i:03d}", np.concatenate(feats).astype(np.float16), np.concatenate(coords),
                          {"mpp": 0.5, "tile_size": 64, "extent_level0": ext[-1], "multiscale": "quadtree",
                           "level_sizes": sizes, "level_mpp": [0.5 * 2 ** (levels - 1 - lvl) for lvl in range(levels)],
                           "level_extent_level0": ext},
                          extra={"level": np.repeat(np.arange(levels), sizes), "parent": np.concatenate(parents)})
        rows.append({"slide_id": f"q{i:03d}", "case_id": f"c{i:03d}", "path": f"slides/q{i:03d}.tiff",
                     "label": f"class{label}"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def bag_data(tmp_path: Path) -> Path:
    return make_feature_bags(tmp_path)


def feature_cfg_overrides(manifest: Path, runs: Path, **extra: object) -> list[str]:
    """Overrides that run an experiment on a fixture store instead of slides."""
    base = {
        "data.manifest": str(manifest),
        "data.store": str(manifest.parent / "store"),
        "data.split.val": 0.25,
        "data.split.test": 0.25,
        "trainer.max_epochs": 2,
        "trainer.accelerator": "cpu",
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "logger.wandb.enabled": False,
        "paths.runs": str(runs),
        "monitor.patience": None,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield
