"""CLAM-like feature bags and results folders for tests (no slides, no model).

Features look like frozen ImageNet / foundation-model features as CLAM writes them: 1024-d,
non-negative (post-ReLU), uncentred, with per-dimension spreads that differ by 30x. A tumour
slide hides a weak signal in a few instances: ``signal`` dimensions (of low spread, among many
of high spread) shifted by ``shift`` of their std. Sizes default to what a 2-core CPU trains
in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from wsi_lightning.features.store import FeatureStore


@dataclass
class Bag:
    slide_id: str
    label: str
    features: np.ndarray  # (N, D) float32, >= 0
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y), 256-px grid


def clam_like_bags(n_slides: int = 80, n_instances: int = 32, dim: int = 1024, positives: int = 3,
                   signal: int = 32, shift: float = 2.0, seed: int = 0) -> list[Bag]:
    """Half the slides are ``tumor``: ``positives`` of their instances carry the signal."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.5, 3.0, dim)  # uncentred
    std = np.exp(rng.uniform(np.log(0.1), np.log(3.0), dim))  # spreads 30x apart
    dims = np.argsort(std)[:signal]  # the signal hides in low-spread dimensions
    bags = []
    for i in range(n_slides):
        tumour = i % 2 == 1
        z = mean + std * rng.standard_normal((n_instances, dim))
        if tumour:
            rows = rng.choice(n_instances, positives, replace=False)
            z[np.ix_(rows, dims)] += shift * std[dims]
        feats = np.maximum(z, 0.0).astype(np.float32)  # post-ReLU: non-negative
        side = int(np.ceil(np.sqrt(n_instances)))
        grid = np.stack(np.divmod(np.arange(n_instances), side), 1)[:, ::-1] * 256
        bags.append(Bag(f"slide_{i:03d}", "tumor" if tumour else "normal", feats, grid.astype(np.int64)))
    return bags


def write_manifest(bags: list[Bag], path: Path, with_path: bool = False) -> Path:
    """A manifest with no ``path`` column (features only) unless ``with_path``."""
    rows = [{"slide_id": b.slide_id, "case_id": f"case_{b.slide_id}", "label": b.label} for b in bags]
    df = pd.DataFrame(rows)
    if with_path:
        df.insert(2, "path", [f"{b.slide_id}.svs" for b in bags])
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def write_store(bags: list[Bag], root: Path) -> FeatureStore:
    """The bags written straight into a feature store (as if imported)."""
    store = FeatureStore(root)
    for b in bags:
        store.write_slide(b.slide_id, b.features, b.coords,
                          {"tile_size": 256, "extent_level0": 256, "extraction": {"source": "test"}})
    return store


PATCH_ATTRS = {"patch_level": 0, "patch_size": 256, "downsample": np.array([1.0, 1.0]),
               "level_dim": np.array([4096, 4096]), "name": "slide"}


def write_clam_results(bags: list[Bag], root: Path) -> tuple[Path, Path]:
    """CLAM's two folders as its scripts lay them out: ``RESULTS/patches/<slide>.h5`` (coords
    with patch attributes, from create_patches_fp.py) and ``FEATURES/h5_files/<slide>.h5``
    (features + coords, no attributes) and ``FEATURES/pt_files/<slide>.pt`` (from
    extract_features_fp.py). Returns (results folder, features folder)."""
    results, features = root / "RESULTS_DIRECTORY", root / "FEATURES_DIRECTORY"
    for sub in (results / "patches", results / "masks", features / "h5_files", features / "pt_files"):
        sub.mkdir(parents=True, exist_ok=True)
    for b in bags:
        with h5py.File(results / "patches" / f"{b.slide_id}.h5", "w") as f:
            ds = f.create_dataset("coords", data=b.coords)
            for k, v in {**PATCH_ATTRS, "name": b.slide_id}.items():
                ds.attrs[k] = v
        with h5py.File(features / "h5_files" / f"{b.slide_id}.h5", "w") as f:
            f.create_dataset("features", data=b.features)
            f.create_dataset("coords", data=b.coords)
        torch.save(torch.from_numpy(b.features), features / "pt_files" / f"{b.slide_id}.pt")
    return results, features


def write_trident_job(bags: list[Bag], root: Path, encoder: str = "uni_v1") -> Path:
    """A TRIDENT job folder: ``<job>/20x_256px_0px_overlap/features_<encoder>/<slide>.h5``
    (and ``patches/``, ``slide_features_*`` beside it, which are not bags)."""
    base = root / "20x_256px_0px_overlap"
    feats_dir = base / f"features_{encoder}"
    for sub in (feats_dir, base / "patches", root / "slide_features_titan"):
        sub.mkdir(parents=True, exist_ok=True)
    for b in bags:
        with h5py.File(feats_dir / f"{b.slide_id}.h5", "w") as f:
            f.create_dataset("features", data=b.features)
            ds = f.create_dataset("coords", data=b.coords)
            for k, v in {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20,
                         "level0_magnification": 40, "overlap": 0, "name": b.slide_id}.items():
                ds.attrs[k] = v
    return root
