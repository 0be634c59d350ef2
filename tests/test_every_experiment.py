"""Every experiment YAML builds its data *and* its method on tiny data and takes a training
step: the DataModule the build picks for the method's input kind serves batches the method
accepts (a mismatched YAML fails here, not after a user's data preparation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import make_feature_bags, make_quadtree_bags
from wsi_lightning import build, config
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.methods.base import SlideEstimator
from wsi_lightning.registry import METHODS

TAGS = {"stain": ("he", "ihc"), "species": ("human", "mouse"), "organ": ("breast", "colon")}


def _with_tags(manifest: Path) -> Path:
    """The manifest with multitag columns (every value on alternate slides)."""
    df = pd.read_csv(manifest)
    for j, (tag, values) in enumerate(TAGS.items()):
        df[tag] = [values[(i // (j + 1)) % 2] for i in range(len(df))]
    df.to_csv(manifest, index=False)
    return manifest


def _concentric(root: Path, n: int = 16, s: int = 3, d: int = 16) -> Path:
    rng = np.random.default_rng(0)
    store, rows = FeatureStore(root / "store"), []
    for i in range(n):
        k = int(rng.integers(20, 40))
        coords = np.stack([np.arange(k) * 100, np.zeros(k)], 1).astype(np.int64)
        store.write_slide(f"m{i:02d}", rng.normal(size=(k, s * d)).astype(np.float32), coords,
                          {"mpp": 0.5, "tile_size": 100, "tile_size_um": 50.0, "level": 0, "extent_level0": 100,
                           "backbone": "synthetic", "weights_hash": "-", "extraction": {}, "scales": s})
        rows.append({"slide_id": f"m{i:02d}", "case_id": f"c{i}", "path": "x.tiff", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from wsi_lightning.demo import make_demo_dataset

    t = tmp_path_factory.mktemp("every")
    slides = make_demo_dataset(t / "slides", n_slides=8, seed=2, workers=1, size_um=768.0)
    return {"none": _with_tags(make_feature_bags(t / "plain")),
            "concentric": _with_tags(_concentric(t / "concentric")),
            "quadtree": _with_tags(make_quadtree_bags(t / "quadtree", n_slides=8)),
            "slides": _with_tags(slides)}


@pytest.mark.parametrize("exp", config.list_experiments())
def test_experiment_builds_data_and_method_and_steps(exp: str, fixtures: dict[str, Path], tmp_path: Path):
    base = config.load(exp, demo=True)  # the CPU-sized settings
    build.import_registered()
    cls = METHODS.get(str(base.method.name))
    layout = build.datamodule_class(base, cls.input_kind).layout
    manifest = fixtures["slides" if layout is None else layout]
    over = [f"data.manifest={manifest}", f"paths.runs={tmp_path}", "data.num_workers=0", "data.split.val=0.25",
            "data.split.test=0.25"]
    if layout is not None:
        over.append(f"data.store={manifest.parent / 'store'}")
    cfg = config.load(exp, over, demo=True)
    cfg.data.is_demo = False  # the demo block's settings on the fixture data
    dm = build.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    cls, kwargs = build.method_kwargs(cfg)
    if issubclass(cls, SlideEstimator):
        assert cls(**kwargs).evaluate(dm, tmp_path)["test/f1_macro"] >= 0.0
        return
    model = build.build_method(cfg, dm.in_dim, dm.num_classes, dm.class_names)
    batch = next(iter(dm.train_dataloader()))
    model.train()
    out = model(batch)
    loss = torch.stack(list({**model.task_loss(out, batch), **out.aux_losses}.values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
